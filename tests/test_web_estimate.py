"""web/memory_estimate.js in headless Chromium, against the fake app of tests/web_harness/: the settings nodes'
memory estimate (their {"ui": {"text": [...]}}) is shown on the node, a WARNING in red, never saved."""
import pytest
import html
import json
import re
import shutil
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


from comfyui_dreambooth.nodes import settings as settings_nodes
from test_web_panel import needs_chromium, run_chromium

REPO = Path(__file__).resolve().parents[1]
HARNESS = REPO / "tests" / "web_harness"
EXTENSION = REPO / "web" / "memory_estimate.js"


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_extension_knows_every_settings_node():
    source = EXTENSION.read_text()
    for name in [*settings_nodes.NODE_CLASS_MAPPINGS, "PerformanceWizard"]:
        assert f'"{name}"' in source, name
    assert '"WARNING"' in source and "onExecuted" in source and "serialize: false" in source
    imports = re.findall(r'^\s*import .* from "([^"]+)"', source, flags=re.M)
    assert imports == ["../../scripts/app.js"]      # ComfyUI's app only


@pytest.mark.slow
@needs_chromium
def test_estimate_is_shown_on_the_node(tmp_path):
    (tmp_path / "scripts").mkdir()
    shutil.copy(HARNESS / "fake_scripts" / "app.js", tmp_path / "scripts" / "app.js")
    (tmp_path / "extensions" / "comfyui-dreambooth").mkdir(parents=True)
    shutil.copy(EXTENSION, tmp_path / "extensions" / "comfyui-dreambooth" / "memory_estimate.js")
    (tmp_path / "harness").mkdir()
    for name in ("estimate.html", "estimate_harness.js"):
        shutil.copy(HARNESS / name, tmp_path / "harness" / name)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        done = run_chromium("--dump-dom", f"http://127.0.0.1:{server.server_address[1]}/harness/estimate.html")
    finally:
        server.shutdown()
        server.server_close()
    found = re.search(r'<pre id="result">(.*?)</pre>', done.stdout, flags=re.S)
    assert found and found.group(1), f"no harness report (rc {done.returncode}); stderr tail:\n{done.stderr[-2000:]}"
    report = json.loads(html.unescape(found.group(1)))
    assert report["done"] and report["errors"] == [], report["errors"]
    assert report["extensions"] == ["comfyui-dreambooth.memory-estimate"]
    assert report["before"]["shown"] is False and report["before"]["widgets"] == 0    # nothing until executed
    settings = report["settings"]
    assert settings["shown"] and settings["widgets"] == 1 and settings["serialize"] is False
    assert settings["text"].startswith("WARNING") and settings["warning"] == "true"   # the latest result, once
    data = report["data"]
    assert data["shown"] and data["warning"] == "false" and "4.00 GB" in data["text"]
    assert report["otherHasHook"] is False                                            # other nodes untouched
    # issue 23.5: the whole estimate (its total line too) is inside its node, which is as wide as intended
    for shown in (report["full"], report["wizard"], settings, data):
        assert shown["shown"] and not shown["scrolls"], shown
        assert shown["boxBottom"] <= shown["size"][1], shown
        assert shown["size"][0] >= 420, shown
    assert report["full"]["text"].endswith("total             3.74 GB")
    # issue 23.4: the PerformanceWizard shows its explanation on itself too
    assert "changed in the connected settings" in report["wizard"]["text"]
