"""A stand-in for ComfyUI's server, enough for ComfyUI's real frontend (the comfyui-frontend-package wheel, the
build ComfyUI pins) to run in headless Chromium without ComfyUI:

  * the frontend's static files, and /api/object_info built from the pack's own node classes (the core nodes the
    examples use from tests/workflow_tools.py's CORE_NODES);
  * the pack's web/ extensions, its example workflows (/api/workflow_templates), and its two routes answered by
    nodes/live_routes.py's state_response / control_response, the code ComfyUI runs;
  * a websocket (/ws) that carries what the pack's LiveReporter sends, as ComfyUI's PromptServer.send_sync does;
  * POST /api/prompt answers a prompt id and, for every TrainDreamBooth node of the prompt, plays a run the way the
    node drives its reporter (stages, steps, Save now taken and confirmed, a requested stop ending "stopped");
  * empty answers for the rest of what the frontend asks at start-up (settings, user data, queue, history, ...).

A harness extension (tests/web_harness/real_frontend_harness.js) served with the pack's plays a scenario in the
page and POSTs its report to /harness/report. Stdlib only; used by tests/test_web_frontend.py.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import math
import mimetypes
import os
import random
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

REPO = Path(__file__).resolve().parents[1]
PACK = "comfyui-dreambooth"
HARNESS = REPO / "tests" / "web_harness" / "real_frontend_harness.js"
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


CHROMIUM = next((path for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
                 if (path := shutil.which(name))), None)


@contextlib.contextmanager
def headless_browser(url: str):
    """Headless Chromium on `url` with a throw-away profile; stopped (terminate, then kill) when the block ends."""
    with tempfile.TemporaryDirectory(prefix="chromium-profile-", ignore_cleanup_errors=True) as profile:
        browser = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
             "--disable-background-networking", "--disable-component-update", f"--user-data-dir={profile}",
             "--window-size=1600,1000", "--remote-debugging-port=0", url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            yield browser
        finally:
            browser.terminate()
            try:
                browser.wait(timeout=30)
            except subprocess.TimeoutExpired:
                browser.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def frontend_root() -> Path | None:
    """The static folder of the installed comfyui-frontend-package, or None."""
    try:
        import comfyui_frontend_package
    except ImportError:
        return None
    root = Path(comfyui_frontend_package.__file__).resolve().parent / "static"
    return root if (root / "index.html").is_file() else None


def _jsonable(value):
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def object_info() -> dict:
    """What ComfyUI's GET /object_info answers for the pack's nodes (server.py node_info) and the core nodes the
    examples use."""
    from comfyui_dreambooth import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from workflow_tools import core_node_classes

    out = {}
    for name, cls in {**core_node_classes(), **NODE_CLASS_MAPPINGS}.items():
        types = cls.INPUT_TYPES()
        returns = tuple(cls.RETURN_TYPES)
        out[name] = {
            "input": _jsonable(types), "input_order": {k: list(v) for k, v in types.items()},
            "output": list(returns), "output_is_list": [False] * len(returns),
            "output_name": list(getattr(cls, "RETURN_NAMES", None) or returns), "name": name,
            "display_name": NODE_DISPLAY_NAME_MAPPINGS.get(name, name),
            "description": getattr(cls, "DESCRIPTION", ""), "python_module": f"custom_nodes.{PACK}",
            "category": getattr(cls, "CATEGORY", "sd"), "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
        }
        if getattr(cls, "OUTPUT_TOOLTIPS", None):
            out[name]["output_tooltips"] = list(cls.OUTPUT_TOOLTIPS)
    return out


def translations() -> dict:
    """GET /i18n as ComfyUI answers it (app/custom_node_manager.py build_translations): each language's
    locales/<lang>/main.json of the pack."""
    found = {}
    for main in sorted((REPO / "locales").glob("*/main.json")):
        found[main.parent.name] = json.loads(main.read_text(encoding="utf-8"))
    return found


SYSTEM_STATS = {
    "system": {"os": "posix", "ram_total": 8 << 30, "ram_free": 4 << 30, "comfyui_version": "0.3.64",
               "required_frontend_version": "1.27.10", "python_version": "3.11", "pytorch_version": "2.13.0",
               "embedded_python": False, "argv": ["main.py"]},
    "devices": [{"name": "cpu", "type": "cpu", "index": None, "vram_total": 0, "vram_free": 0,
                 "torch_vram_total": 0, "torch_vram_free": 0}],
}


class StandIn(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, *, steps: int = 400, steps_per_epoch: int = 20, step_s: float = 0.1, harness: bool = True):
        super().__init__(("127.0.0.1", 0), Handler)
        self.static = frontend_root()
        self.steps, self.steps_per_epoch, self.step_s = steps, steps_per_epoch, step_s
        self.harness = harness
        self.sockets: list = []
        self.sockets_lock = threading.Lock()
        self.reports: list = []
        self.report_ready = threading.Event()
        self.prompts: list[dict] = []
        self.object_info = object_info()
        self.on_shot = None          # tests/frontend_shots.py: takes a screenshot named by the harness

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    # --- the websocket: what PromptServer.send_sync does ------------------------------------------------------
    def broadcast(self, event: str, data: dict) -> None:
        frame = _ws_frame(json.dumps({"type": event, "data": data}).encode())
        with self.sockets_lock:
            for sock in list(self.sockets):
                try:
                    sock.sendall(frame)
                except OSError:
                    self.sockets.remove(sock)

    # --- a queued prompt ------------------------------------------------------------------------------------
    def queue(self, body: dict) -> dict:
        prompt_id = str(uuid.uuid4())
        prompt = body.get("prompt") or {}
        self.prompts.append({"prompt_id": prompt_id, "prompt": prompt})
        for node_id, node in prompt.items():
            if isinstance(node, dict) and node.get("class_type") == "TrainDreamBooth":
                threading.Thread(target=self.play_run, args=(prompt_id, str(node_id)), daemon=True).start()
        return {"prompt_id": prompt_id, "number": len(self.prompts), "node_errors": {}}

    def play_run(self, prompt_id: str, node_id: str) -> None:
        """A run as TrainDreamBooth reports it (nodes/train.py): stages, steps, requested saves, a stop."""
        from comfyui_dreambooth.nodes import live
        from comfyui_dreambooth.nodes.train import stopped_message

        reporter = live.LiveReporter(node_id, "", prompt_id=prompt_id, send=self.broadcast)
        control = reporter.trainer_control
        for done in (1, 2):
            reporter.stage(f"caching latents (disk) for the 2 images of concept 1 in 1 bucket: {done}/2")
            time.sleep(self.step_s)
        started = time.monotonic()
        noise = random.Random(0)
        for step in range(1, self.steps + 1):
            time.sleep(self.step_s)
            rate = step / (time.monotonic() - started)
            loss = max(0.01, 0.06 + 0.14 * math.exp(-step / 90) + noise.gauss(0, 0.03))   # a DreamBooth-like loss
            reporter.progress(step, self.steps, (step - 1) // self.steps_per_epoch + 1, loss, 1e-4,
                              rate, (self.steps - step) / rate, epochs=-(-self.steps // self.steps_per_epoch))
            if control.take_save_request():
                time.sleep(self.step_s)          # writing the checkpoint
                reporter.stage(f"saved output/dreambooth/standin/checkpoints/step-{step:07d} (requested)")
            if control.should_stop(epoch_end=step % self.steps_per_epoch == 0) and step < self.steps:
                reporter.status("stopped", stopped_message(step))
                return
        reporter.status("done", "finished output/dreambooth/standin")


def _ws_frame(payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x81, n)
    elif n < 1 << 16:
        header = struct.pack("!BBH", 0x81, 126, n)
    else:
        header = struct.pack("!BBQ", 0x81, 127, n)
    return header + payload


class Handler(BaseHTTPRequestHandler):
    server: StandIn
    protocol_version = "HTTP/1.1"      # a websocket handshake must answer HTTP/1.1 101

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, value, status: int = 200) -> None:
        self._send(status, json.dumps(value).encode())

    def _file(self, path: Path) -> None:
        if not path.is_file():
            return self._json({"error": f"not found: {self.path}"}, 404)
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if path.suffix in (".js", ".mjs"):
            kind = "text/javascript"
        self._send(200, path.read_bytes(), kind)

    def _body(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return None

    # --- GET ------------------------------------------------------------------------------------------------
    def do_GET(self):  # noqa: C901 - one branch per route
        from comfyui_dreambooth.nodes import live_routes

        url = urlparse(self.path)
        path = unquote(url.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if path in ("/ws", "/api/ws"):
            return self._websocket()
        if path.startswith("/extensions/" + PACK + "/"):
            return self._file(REPO / "web" / path.rsplit("/", 1)[1])
        if path == "/extensions/dreambooth-harness/harness.js":
            return self._file(HARNESS)
        route = path[4:] if path.startswith("/api/") else path
        answers = {
            "/object_info": lambda: self.server.object_info,
            "/extensions": lambda: [f"/extensions/{PACK}/{name}" for name in ("dreambooth.js", "memory_estimate.js")]
            + (["/extensions/dreambooth-harness/harness.js"] if self.server.harness else []),
            "/users": lambda: {"storage": "server", "migrated": True},
            "/settings": lambda: {"Comfy.TutorialCompleted": True, "Comfy.Workflow.ShowMissingModelsWarning": False,
                                  "Comfy.Minimap.Visible": False},
            "/system_stats": lambda: SYSTEM_STATS,
            "/embeddings": lambda: [], "/features": lambda: {}, "/i18n": translations,
            "/queue": lambda: {"queue_running": [], "queue_pending": []}, "/history": lambda: {},
            "/models": lambda: [], "/experiment/models": lambda: [], "/userdata": lambda: [],
            "/v2/userdata": lambda: [], "/prompt": lambda: {"exec_info": {"queue_remaining": 0}},
            "/workflow_templates": lambda: {PACK: sorted(p.stem for p in (REPO / "example_workflows").glob("*.json"))},
            "/templates/index.json": lambda: [],
        }
        if route in answers:
            return self._json(answers[route]())
        if route == "/dreambooth/state":
            status, body = live_routes.state_response(query.get("node"))
            return self._json(body, status)
        if route.startswith(f"/workflow_templates/{PACK}/"):
            return self._file(REPO / "example_workflows" / route.rsplit("/", 1)[1])
        if route.startswith("/settings/") or route.startswith("/userdata/") or route.startswith("/history"):
            return self._json(None if route.startswith("/settings/") else {}, 200 if "settings" in route else 404)
        if path == "/" or path == "/index.html":
            return self._file(self.server.static / "index.html")
        target = (self.server.static / path.lstrip("/")).resolve()
        if self.server.static in target.parents:
            return self._file(target)
        return self._json({"error": f"the stand-in has no route {path}"}, 404)

    # --- POST -----------------------------------------------------------------------------------------------
    def do_POST(self):
        from comfyui_dreambooth.nodes import live_routes

        path = unquote(urlparse(self.path).path)
        route = path[4:] if path.startswith("/api/") else path
        body = self._body()
        if route == "/prompt":
            return self._json(self.server.queue(body or {}))
        if route == "/dreambooth/control":
            status, answer = live_routes.control_response(body)
            return self._json(answer, status)
        if route == "/harness/shot":
            if self.server.on_shot is not None:
                self.server.on_shot(str((body or {}).get("name") or "shot"), (body or {}).get("clip"))
            return self._json({"ok": True})
        if route == "/harness/report":
            self.server.reports.append(body)
            self.server.report_ready.set()
            return self._json({"ok": True})
        return self._json({}, 200)        # settings, user data, /free, ...

    # --- the websocket ----------------------------------------------------------------------------------------
    def _websocket(self):
        key = self.headers.get("Sec-WebSocket-Key")
        if not key:
            return self._json({"error": "websocket only"}, 400)
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        sock = self.connection
        status = {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "standin"}}
        sock.sendall(_ws_frame(json.dumps(status).encode()))
        with self.server.sockets_lock:
            self.server.sockets.append(sock)
        try:
            while True:                      # read (and drop) the client's frames until it closes
                head = self.rfile.read(2)
                if len(head) < 2 or head[0] & 0x0F == 0x8:
                    break
                length = head[1] & 0x7F
                if length == 126:
                    length = struct.unpack("!H", self.rfile.read(2))[0]
                elif length == 127:
                    length = struct.unpack("!Q", self.rfile.read(8))[0]
                self.rfile.read(4 + length if head[1] & 0x80 else length)
        except OSError:
            pass
        finally:
            with self.server.sockets_lock:
                if sock in self.server.sockets:
                    self.server.sockets.remove(sock)
        self.close_connection = True


def serve(**kwargs) -> StandIn:
    """Start a stand-in in a thread; stop it with .shutdown() and .server_close()."""
    server = StandIn(**kwargs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


if __name__ == "__main__":        # for a look by hand: python tests/frontend_standin.py, then open the URL
    import sys

    sys.path.insert(0, str(REPO / "tests"))
    standin = serve(harness=False, step_s=0.5)
    print(standin.url, flush=True)
    threading.Event().wait()
