"""Load workflows into ComfyUI's real frontend in headless Chromium; report what the frontend makes of them.

    python frontend_probe.py SERVER_URL OUT.json NAME [NAME ...]     (run with ComfyUI's Python: it needs aiohttp)

For each NAME (a file of the pack's example_workflows, fetched from the server's /api/workflow_templates route)
the page calls app.loadGraphData(workflow), then app.graph.serialize() (the canvas as the frontend would save it)
and app.graphToPrompt() (what pressing Run would POST). OUT.json: {NAME: {"serialized", "prompt"}} plus a
screenshot NAME.png next to it. Talks to Chromium over the DevTools protocol (aiohttp websocket client).
"""
import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

import aiohttp

PACK = "comfyui_dreambooth"
WAIT_FOR_APP = ("new Promise(r => { const t = setInterval(() => { if (window.app && window.app.graph && "
                "window.app.canvas) { clearInterval(t); r(true); } }, 200); })")
LOAD = """(async () => {
  const wf = await (await fetch('/api/workflow_templates/%s/' + encodeURIComponent(%s) + '.json')).json();
  await window.app.loadGraphData(wf);
  await new Promise(r => setTimeout(r, 500));
  const serialized = window.app.graph.serialize();
  const prompt = (await window.app.graphToPrompt()).output;
  document.querySelectorAll('.p-dialog-mask').forEach(m => m.remove());
  window.app.canvas.ds.scale = 0.42; window.app.canvas.ds.offset = [60, 220];
  window.app.graph.setDirtyCanvas(true, true);
  await new Promise(r => setTimeout(r, 800));
  return JSON.stringify({serialized, prompt});
})()"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    raise SystemExit("no chromium")


async def probe(url: str, names: list[str], out_path: str, port: int) -> None:
    pages = None
    for _ in range(100):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=5) as r:
                pages = json.load(r)
            break
        except OSError:
            time.sleep(0.3)
    page = next(p for p in pages if p["type"] == "page")
    results = {}
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            counter = [0]

            async def call(method, **params):
                counter[0] += 1
                await ws.send_json({"id": counter[0], "method": method, "params": params})
                while True:
                    message = await ws.receive_json()
                    if message.get("id") == counter[0]:
                        if "error" in message:
                            raise RuntimeError(f"{method}: {message['error']}")
                        return message["result"]

            async def evaluate(expression):
                result = await call("Runtime.evaluate", expression=expression, awaitPromise=True, timeout=120000)
                if "exceptionDetails" in result:
                    raise RuntimeError(json.dumps(result["exceptionDetails"])[:2000])
                return result["result"].get("value")

            await call("Page.navigate", url=url)
            await evaluate(WAIT_FOR_APP)
            await asyncio.sleep(2)
            for name in names:
                results[name] = json.loads(await evaluate(LOAD % (PACK, json.dumps(name))))
                shot = await call("Page.captureScreenshot", format="png")
                with open(os.path.join(os.path.dirname(out_path), name + ".png"), "wb") as f:
                    f.write(base64.b64decode(shot["data"]))
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(results, f)


def main() -> None:
    url, out_path, names = sys.argv[1], sys.argv[2], sys.argv[3:]
    port = 9300 + os.getpid() % 500
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    browser = subprocess.Popen([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                "--disable-background-networking", f"--remote-debugging-port={port}",
                                f"--user-data-dir={profile}", "--window-size=1600,1000", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        asyncio.run(asyncio.wait_for(probe(url, names, out_path, port), timeout=240))
    finally:
        browser.terminate()
        browser.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main()
