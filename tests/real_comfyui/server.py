"""Start a real ComfyUI server for the opt-in tests, and talk to it (stdlib only).

ComfyServer(comfyui_dir, python, base_dir).start() runs
    python main.py --cpu --listen 127.0.0.1 --port <free> --disable-auto-launch --disable-api-nodes
                   --base-directory <base_dir> --database-url sqlite:///:memory:
so models/, custom_nodes/, input/, output/ all live in base_dir (the ComfyUI checkout is not written to), and
waits for /object_info. queue() POSTs an API-format prompt to /prompt; wait() polls /history/<id>.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid


class ComfyError(AssertionError):
    """The server refused a prompt, a prompt failed, or the server did not come up (message has the log tail)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, comfyui_dir: str, python: str, base_dir: str, extra_args: tuple = ()):
        self.comfyui_dir, self.python, self.base_dir = comfyui_dir, python, base_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(base_dir, "comfyui.log")
        self.extra_args = tuple(extra_args)
        self.process: subprocess.Popen | None = None
        self.client_id = uuid.uuid4().hex

    # ---- lifecycle --------------------------------------------------------------------------------------------
    def start(self, timeout: float = 300.0) -> "ComfyServer":
        for sub in ("models", "custom_nodes", "input", "output", "user"):
            os.makedirs(os.path.join(self.base_dir, sub), exist_ok=True)
        args = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                "--disable-auto-launch", "--disable-api-nodes", "--base-directory", self.base_dir,
                "--database-url", "sqlite:///:memory:", *self.extra_args]
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(args, cwd=self.comfyui_dir, stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ComfyError(f"ComfyUI exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                self.get("/object_info", timeout=10)
                return self
            except (OSError, urllib.error.URLError):
                time.sleep(1)
        self.stop()
        raise ComfyError(f"ComfyUI did not answer /object_info within {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def log_text(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_text()[-chars:]

    # ---- HTTP ---------------------------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            body = response.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def post(self, path: str, data: dict, timeout: float = 60):
        request = urllib.request.Request(self.url + path, data=json.dumps(data).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    # ---- prompts ------------------------------------------------------------------------------------------------
    def queue(self, prompt: dict, *, allow_node_errors: bool = False) -> str:
        status, answer = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})
        if status != 200 or (answer.get("node_errors") and not allow_node_errors):
            raise ComfyError(f"/prompt refused ({status}): {json.dumps(answer)[:3000]}")
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600.0) -> dict:
        """The /history entry once the prompt finished; ComfyError when it failed or timed out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            entry = history.get(prompt_id) if isinstance(history, dict) else None
            if entry and (entry.get("status") or {}).get("completed") is not None \
                    and (entry["status"]["completed"] or entry["status"].get("status_str") == "error"):
                if entry["status"].get("status_str") != "success":
                    messages = [m for m in entry["status"].get("messages", []) if m[0] == "execution_error"]
                    raise ComfyError(f"prompt failed: {json.dumps(messages)[:4000]}\n{self.log_tail(3000)}")
                return entry
            if self.process is not None and self.process.poll() is not None:
                raise ComfyError(f"ComfyUI died while running the prompt:\n{self.log_tail()}")
            time.sleep(1)
        raise ComfyError(f"prompt {prompt_id} did not finish within {timeout:.0f}s:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 600.0) -> dict:
        return self.wait(self.queue(prompt), timeout)

    def output_files(self, entry: dict, node_id: str, key: str = "images") -> list[str]:
        """Paths (under the base directory) of the files a node reported in its ui output."""
        items = ((entry.get("outputs") or {}).get(node_id) or {}).get(key) or []
        folders = {"output": "output", "temp": "temp", "input": "input"}
        return [os.path.join(self.base_dir, folders.get(i.get("type", "output"), "output"), i.get("subfolder", ""),
                             i["filename"]) for i in items]
