"""Regenerate the README's screenshots of the live panel and the example workflows' template thumbnails, taken in
ComfyUI's real frontend served by tests/frontend_standin.py (headless Chromium, driven over its DevTools socket):

    .venv/bin/python tests/frontend_shots.py        # writes docs/panel-*.png and example_workflows/<name>.jpg

The harness (tests/web_harness/real_frontend_harness.js, scenario "shots") queues the LoRA example, asks for a
screenshot mid-run and after a stop from the panel (POST /api/harness/shot waits until it is taken), then shows each
example workflow in turn. Stdlib + Pillow only.
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import frontend_standin  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
EXAMPLES = REPO / "example_workflows"
THUMBNAIL_WIDTH = 640


class DevTools:
    """A minimal client of one page's DevTools websocket (text frames, one call at a time)."""

    def __init__(self, ws_url: str):
        rest = ws_url.removeprefix("ws://")
        host, _, path = rest.partition("/")
        name, _, port = host.partition(":")
        self.sock = socket.create_connection((name, int(port)), timeout=60)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /{path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += self.sock.recv(1)
        if b" 101 " not in answer.split(b"\r\n")[0]:
            raise RuntimeError(f"DevTools refused the websocket: {answer[:200]!r}")
        self.next_id = 0

    def _recv_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("DevTools closed the socket")
            data += chunk
        return data

    def _recv_message(self) -> str:
        parts = []
        while True:
            first, second = self._recv_exact(2)
            length = second & 0x7F
            if length == 126:
                length = struct.unpack("!H", self._recv_exact(2))[0]
            elif length == 127:
                length = struct.unpack("!Q", self._recv_exact(8))[0]
            parts.append(self._recv_exact(length))
            if first & 0x80:
                return b"".join(parts).decode()

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        payload = json.dumps({"id": self.next_id, "method": method, "params": params}).encode()
        mask = os.urandom(4)
        n = len(payload)
        header = struct.pack("!B", 0x81) + (struct.pack("!B", 0x80 | n) if n < 126 else
                                            struct.pack("!BH", 0x80 | 126, n) if n < 65536 else
                                            struct.pack("!BQ", 0x80 | 127, n))
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        while True:
            message = json.loads(self._recv_message())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def png(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])


def main() -> int:
    from PIL import Image

    chromium = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                    None)
    if chromium is None or frontend_standin.frontend_root() is None:
        print("needs chromium and comfyui-frontend-package", file=sys.stderr)
        return 1
    server = frontend_standin.serve(step_s=0.05)
    port = frontend_standin.free_port()
    tools: list[DevTools] = []
    written = []

    def shot(name: str, clip=None) -> None:
        image = Image.open(io.BytesIO(tools[0].png())).convert("RGB")
        if isinstance(clip, list) and len(clip) == 4:
            x, y, width, height = (int(v) for v in clip)
            image = image.crop((max(0, x), max(0, y), min(image.width, x + width), min(image.height, y + height)))
        if name.startswith("example:"):
            stem = name.removeprefix("example:")
            image.thumbnail((THUMBNAIL_WIDTH, THUMBNAIL_WIDTH))
            path = EXAMPLES / f"{stem}.jpg"
            image.save(path, quality=80)
        else:
            DOCS.mkdir(exist_ok=True)
            path = DOCS / f"{name}.png"
            image.save(path, optimize=True)
        written.append(path)

    server.on_shot = shot
    with tempfile.TemporaryDirectory(prefix="chromium-profile-", ignore_cleanup_errors=True) as profile:
        browser = subprocess.Popen([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                    "--disable-background-networking", "--hide-scrollbars",
                                    "--force-device-scale-factor=1", f"--user-data-dir={profile}",
                                    "--window-size=1400,900", f"--remote-debugging-port={port}", "about:blank"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(100):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=5) as answer:
                        pages = [p for p in json.load(answer) if p["type"] == "page"]
                    if pages:
                        break
                except OSError:
                    pass
                time.sleep(0.2)
            tools.append(DevTools(pages[0]["webSocketDebuggerUrl"]))
            tools[0].call("Page.navigate", url=f"{server.url}/?scenario=shots")
            if not server.report_ready.wait(180):
                print("no report from the harness", file=sys.stderr)
                return 1
        finally:
            browser.terminate()
            browser.wait(timeout=30)
            server.shutdown()
            server.server_close()
    report = server.reports[0]
    for path in written:
        print(path.relative_to(REPO))
    if report.get("errors"):
        print("harness errors:", report["errors"], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
