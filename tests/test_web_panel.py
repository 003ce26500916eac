"""web/dreambooth.js in headless Chromium, against the fake app/api of tests/web_harness/.

A throwaway site on 127.0.0.1 is laid out like ComfyUI's, so the extension's own imports resolve unchanged:
    /scripts/app.js, /scripts/api.js              <- tests/web_harness/fake_scripts/ (fakes)
    /extensions/comfyui-dreambooth/dreambooth.js  <- web/dreambooth.js (the file under test)
    /harness/                                     <- index.html, harness.js, messages.json, state.json
    /api/view?filename=..                         <- preview PNGs made here (ComfyUI's image route)
The harness plays a scenario and writes a JSON report into the page, read back with --dump-dom; one more run
takes a PNG screenshot whose chart area must hold the drawn curves.
"""
import html
import json
import re
import shutil
import subprocess
import tempfile
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest

from comfyui_dreambooth.nodes import live

REPO = Path(__file__).resolve().parents[1]
HARNESS = REPO / "tests" / "web_harness"
EXTENSION = REPO / "web" / "dreambooth.js"
CHROMIUM = next((path for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
                 if (path := shutil.which(name))), None)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--force-device-scale-factor=1",
                  # makes --dump-dom/--screenshot wait for the harness's timers and fetches
                  "--virtual-time-budget=15000"]
BACKGROUND = (22, 22, 22)   # the chart's background colour (COLORS.background in dreambooth.js)
NODE_ID = "5"

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install -y chromium; CI installs it)")


# --- static checks (no browser) ------------------------------------------------------------------------------
def test_extension_talks_the_backend_protocol():
    source = EXTENSION.read_text()
    for name in (live.PROGRESS_EVENT, live.PREVIEW_EVENT, live.STATUS_EVENT, "/dreambooth/state",
                 "/dreambooth/control", '"TrainDreamBooth"', '"reconnected"', "save_now", "stop_after_epoch"):
        assert name in source, name
    for state in live.TERMINAL_STATES:
        assert f'"{state}"' in source, state
    imports = re.findall(r'^\s*import .* from "([^"]+)"', source, flags=re.M)
    assert imports == ["../../scripts/app.js", "../../scripts/api.js"]   # ComfyUI's app/api only


def test_the_web_folder_is_registered_once():
    """Issue 23.7: [tool.comfy] web registers web/ under the project name and WEB_DIRECTORY under the folder name:
    in a folder named otherwise, ComfyUI listed every extension twice. WEB_DIRECTORY alone works in every version."""
    import tomllib

    import comfyui_dreambooth

    assert comfyui_dreambooth.WEB_DIRECTORY == "./web"
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "web" not in config["tool"]["comfy"]


# --- the site --------------------------------------------------------------------------------------------------
class SiteHandler(SimpleHTTPRequestHandler):
    """Static files, plus ComfyUI's /api/view answered from the preview folder (requests are recorded)."""

    def __init__(self, *args, previews: Path, view_requests: list, **kwargs):
        self.previews = previews
        self.view_requests = view_requests
        super().__init__(*args, **kwargs)

    def do_GET(self):
        url = urlparse(self.path)
        if url.path != "/api/view":
            return super().do_GET()
        query = {key: values[0] for key, values in parse_qs(url.query).items()}
        self.view_requests.append(query)
        image = self.previews / Path(query.get("filename", "")).name
        if not image.is_file():
            return self.send_error(404, "no such preview")
        data = image.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def preview_names() -> set[str]:
    names = set()
    for message in json.loads((HARNESS / "messages.json").read_text()):
        names.update(image["filename"] for image in message["data"].get("images", []))
    for state in json.loads((HARNESS / "state.json").read_text())["nodes"].values():
        names.update(image["filename"] for image in state["previews"])
    return names


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from PIL import Image, ImageDraw

    root = tmp_path_factory.mktemp("site")
    (root / "scripts").mkdir()
    for fake in ("app.js", "api.js"):
        shutil.copy(HARNESS / "fake_scripts" / fake, root / "scripts" / fake)
    (root / "extensions" / "comfyui-dreambooth").mkdir(parents=True)
    shutil.copy(EXTENSION, root / "extensions" / "comfyui-dreambooth" / "dreambooth.js")
    (root / "harness").mkdir()
    for name in ("index.html", "harness.js", "messages.json", "state.json"):
        shutil.copy(HARNESS / name, root / "harness" / name)
    previews = root / "previews"
    previews.mkdir()
    for i, name in enumerate(sorted(preview_names())):
        image = Image.new("RGB", (64, 64), (40 + 50 * (i % 4), 90, 170))
        ImageDraw.Draw(image).ellipse((14, 14, 50, 50), fill=(235, 205, 120))
        image.save(previews / name)

    view_requests: list[dict] = []
    handler = partial(SiteHandler, directory=str(root), previews=previews, view_requests=view_requests)
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield {"url": f"http://127.0.0.1:{server.server_address[1]}/harness/index.html", "root": root,
               "view_requests": view_requests}
    finally:
        server.shutdown()
        server.server_close()


def run_chromium(*args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=120)


def harness_report(site, scenario: str) -> dict:
    done = run_chromium("--dump-dom", f"{site['url']}?scenario={scenario}")
    found = re.search(r'<pre id="result">(.*?)</pre>', done.stdout, flags=re.S)
    assert found and found.group(1), f"no harness report (rc {done.returncode}); stderr tail:\n{done.stderr[-2000:]}"
    report = json.loads(html.unescape(found.group(1)))
    assert report["done"] and report["errors"] == [], report["errors"]
    assert report["extensions"] == ["comfyui-dreambooth.live-panel"]
    return report


def assert_chart_drawn(chart: dict):
    assert chart["background"] == list(BACKGROUND)
    assert chart["nonBackground"] > 2000, chart       # grid, labels and two curves
    assert chart["smooth"] > 150, chart               # the orange smoothed curve
    assert chart["raw"] > 300, chart                  # the blue raw curve
    assert chart["validation"] > 100, chart           # issue 20: the green validation curve


@pytest.fixture(scope="module")
def replay(site):
    return harness_report(site, "replay")


# --- scenarios ---------------------------------------------------------------------------------------------------
@needs_chromium
def test_replayed_run_fills_the_panel(replay, site):
    messages = json.loads((HARNESS / "messages.json").read_text())
    last = [m["data"] for m in messages if m["type"] == live.PROGRESS_EVENT][-1]
    node = replay["node"]
    assert node["panel"] and node["widgets"] == 1
    assert node["size"][0] >= 380        # issue 23.7: the intended width sticks (LiteGraph sizes are not Arrays)
    assert node["serialize"] is False                 # the panel never lands in the workflow's widgets_values
    assert replay["other"] == {"panel": False, "widgets": 0}   # only TrainDreamBooth nodes get one
    assert node["state"] == "done" and node["message"] == "saved loras/demo.safetensors"
    assert node["fields"] == {"step": f"{last['step']} / {last['total']}", "epoch": str(last["epoch"]),
                              "loss": f"{last['loss']:.4f}", "lr": "1.00e-4", "speed": "10.00 it/s", "eta": "0s"}
    assert all(button["disabled"] for button in node["buttons"])   # a finished run takes no requests
    assert_chart_drawn(node["chart"])
    # latest previews, fetched through ComfyUI's /view route with filename/subfolder/type
    last_preview = [m["data"] for m in messages if m["type"] == live.PREVIEW_EVENT][-1]
    assert node["previewLabel"] == f"previews at step {last_preview['step']}"
    assert [p["loaded"] for p in node["previews"]] == [True] * len(last_preview["images"])
    requested = [r for r in site["view_requests"] if r["filename"] in {i["filename"] for i in last_preview["images"]}]
    assert {(r["filename"], r["subfolder"], r["type"]) for r in requested} == {
        (i["filename"], i["subfolder"], i["type"]) for i in last_preview["images"]}
    assert replay["calls"] == [{"route": "/dreambooth/state", "method": "GET", "body": None}]   # restore on setup
    # issue 23.1: before its workflow was queued the panel showed nothing; the queue bound it to its prompt
    assert replay["beforeQueue"]["state"] == "idle" and replay["beforeQueue"]["message"].startswith("Queue the workflow")
    assert replay["boundPrompts"] == [messages[0]["data"]["prompt"]] == [replay["queueAnswer"]["prompt_id"]]


@needs_chromium
def test_screenshot_shows_a_non_empty_chart(replay, site, tmp_path):
    from PIL import Image

    shot = tmp_path / "panel.png"
    done = run_chromium("--window-size=480,460", f"--screenshot={shot}", f"{site['url']}?scenario=replay")
    assert shot.is_file(), done.stderr[-2000:]
    rect = replay["node"]["chart"]["rect"]
    box = (round(rect["x"]), round(rect["y"]), round(rect["x"] + rect["width"]), round(rect["y"] + rect["height"]))
    chart = np.asarray(Image.open(shot).convert("RGB").crop(box)).astype(int)
    assert chart.shape == (rect["height"], rect["width"], 3)
    r, g, b = chart[..., 0], chart[..., 1], chart[..., 2]
    background = int((np.abs(chart - np.array(BACKGROUND)).sum(axis=-1) <= 30).sum())
    orange = int(((r > 200) & (g > 120) & (g < 200) & (b < 110)).sum())
    blue = int(((b > 120) & (b > r + 40) & (b > g + 15)).sum())
    assert background > chart.shape[0] * chart.shape[1] * 0.5, "the crop is not the chart (no background colour)"
    assert chart.shape[0] * chart.shape[1] - background > 2000 and orange > 150 and blue > 300, \
        (background, orange, blue, shot)


@needs_chromium
def test_reloaded_page_restores_the_run_and_refreshes_on_reconnect(site):
    report = harness_report(site, "restore")
    state = json.loads((HARNESS / "state.json").read_text())["nodes"][NODE_ID]
    node = report["node"]
    assert node["state"] == state["state"] == "running"
    assert node["fields"]["step"] == f"{state['step']} / {state['total']}"
    assert node["fields"]["eta"] == "15s"
    assert node["previewLabel"] == f"previews at step {state['preview_step']}"
    assert [p["loaded"] for p in node["previews"]] == [True] * len(state["previews"])
    assert not any(button["disabled"] for button in node["buttons"])
    assert_chart_drawn(node["chart"])
    after = report["afterReconnect"]                   # "reconnected" -> GET /dreambooth/state again
    assert after["fields"]["step"] == f"180 / {state['total']}" and after["fields"]["eta"] == "12s"
    assert [call["route"] for call in report["calls"]] == ["/dreambooth/state", "/dreambooth/state"]


@needs_chromium
def test_buttons_post_control_requests(site):
    report = harness_report(site, "buttons")
    posts = [call for call in report["calls"] if call["method"] == "POST"]
    assert all(call["route"] == "/dreambooth/control" for call in posts)
    run = json.loads((HARNESS / "state.json").read_text())["nodes"][NODE_ID]["run"]
    assert [call["body"] for call in posts] == [{"node": NODE_ID, "run": run, "action": "save_now"},
                                                {"node": NODE_ID, "run": run, "action": "stop_after_epoch"},
                                                {"node": NODE_ID, "run": run, "action": "save_now"}]
    # issue 23.3: Save now is confirmed: the notice gives way to "saving ...", then to "saved step N"
    step = json.loads((HARNESS / "state.json").read_text())["nodes"][NODE_ID]["step"]
    assert report["afterSaveClick"]["message"] == "harness accepted save_now"
    assert report["whileSaving"]["state"] == "saving"
    assert report["whileSaving"]["message"] == f"saving a checkpoint at step {step}…"
    assert report["afterSaved"]["state"] == "running" and report["afterSaved"]["message"] == f"saved step {step}"
    after = report["afterClicks"]
    assert after["message"] == "harness accepted stop_after_epoch"
    buttons = {button["action"]: button for button in after["buttons"]}
    assert buttons["stop_after_epoch"]["disabled"] and buttons["stop_after_epoch"]["text"] == "Stopping after epoch…"
    assert not buttons["save_now"]["disabled"]        # saving again stays possible
    failed = report["afterFailedClick"]
    assert failed["message"] == "Could not save now: no training run is active for node '5'"


@needs_chromium
def test_a_stale_panel_is_refused_then_shows_and_controls_the_current_run(site):
    """Issue 10.3: a tab that missed the start of a newer run on its node sends the run id it shows; the server
    answers 409 (nothing happens to the new run), the panel fetches the state, shows the new run, and the next
    click names that run."""
    report = harness_report(site, "stale")
    old_run = json.loads((HARNESS / "state.json").read_text())["nodes"][NODE_ID]["run"]
    posts = [call["body"] for call in report["calls"] if call["method"] == "POST"]
    assert posts == [{"node": NODE_ID, "run": old_run, "action": "save_now"},
                     {"node": NODE_ID, "run": "demo-run-0002", "action": "save_now"}]
    stale = report["afterStaleClick"]
    assert stale["message"].startswith("Not sent: this panel showed an older run")
    assert stale["fields"]["step"] == "3 / 300" and stale["previews"] == []   # the current run, fetched again
    assert [call["route"] for call in report["calls"]] == [
        "/dreambooth/state", "/dreambooth/control", "/dreambooth/state", "/dreambooth/control"]
    assert report["afterRetry"]["message"] == "harness accepted save_now"


@needs_chromium
def test_a_stopped_run_says_so_and_shows_no_eta(site):
    """Issue 23.2: a stop requested from the panel ends as "stopped at step N (checkpoint saved)", not failed, and
    the STOPPED panel shows no ETA."""
    report = harness_report(site, "stopped")
    state = json.loads((HARNESS / "state.json").read_text())["nodes"][NODE_ID]
    assert report["node"]["fields"]["eta"] == "15s"                      # running: an ETA
    stopped = report["afterStop"]
    assert stopped["state"] == "stopped" and stopped["message"] == f"stopped at step {state['step']} (checkpoint saved)"
    assert stopped["fields"]["eta"] == "–" and stopped["fields"]["step"] == f"{state['step']} / {state['total']}"
    assert all(button["disabled"] for button in stopped["buttons"])


@needs_chromium
def test_a_panel_shows_and_controls_only_its_own_workflows_run(site):
    """Issue 23.1: node 5 of a new workflow showed the run of node 5 of another workflow, and its buttons would
    have acted on it. A panel shows only runs of prompts its own workflow queued; one that has not run shows
    nothing and has no buttons to press."""
    report = harness_report(site, "workflows")
    state = json.loads((HARNESS / "state.json").read_text())["nodes"][NODE_ID]
    assert report["node"]["fields"]["step"] == f"{state['step']} / {state['total']}"    # its own run
    for empty in (report["newTab"], report["unknown"]):
        assert empty["state"] == "idle" and empty["message"].startswith("Queue the workflow")
        assert set(empty["fields"].values()) == {"–"} and empty["previews"] == [] and empty["previewLabel"] == ""
        assert all(button["disabled"] for button in empty["buttons"])
        assert empty["chart"]["smooth"] == 0 and empty["chart"]["raw"] == 0
    after = report["afterQueue"]
    assert after["newTabPrompts"] == ["prompt-b"] and after["firstPrompts"] == [state["prompt"]]
    assert after["newTab"]["fields"]["step"] == "2 / 10" and after["newTab"]["state"] == "running"
    assert after["first"]["fields"]["step"] == f"{state['step']} / {state['total']}"   # still its own run
    assert after["first"]["fields"] == report["node"]["fields"]
    assert after["unknown"]["state"] == "idle"
    posts = [call["body"] for call in report["calls"] if call["method"] == "POST"]
    assert posts == [{"node": NODE_ID, "run": "run-b", "action": "save_now"}]    # the run that panel shows


@needs_chromium
def test_long_stage_messages_the_imagic_stage_and_the_epoch_count_are_shown(site):
    """Issue 23.6: a long stage message was cut at the panel's edge, hiding the counter at its end; Imagic's stage
    was never shown."""
    report = harness_report(site, "details")
    long = report["longMessage"]
    assert long["message"] == long["sent"] and long["message"].endswith("7/8") and not long["messageClipped"]
    assert report["imagic"]["labels"]["epoch"] == "stage" and report["imagic"]["fields"]["epoch"] == "unet (2/2)"
    assert report["epochs"]["labels"]["epoch"] == "epoch" and report["epochs"]["fields"]["epoch"] == "3 / 5"


@needs_chromium
def test_a_train_node_inside_a_subgraph_shows_and_controls_only_its_own_run(site):
    """Issue 23: inside a subgraph ComfyUI runs node 5 as "12:5" (the subgraph node's id, then its own), and the
    server's messages and control route name it so; the canvas knows it as 5. The panel of a Train node in a
    subgraph binds to the queued prompt, shows its own run (not node 5 of the root graph's) and controls it."""
    report = harness_report(site, "subgraph")
    assert report["executionIds"] == {"onRoot": ["5"], "inSubgraph": ["12:5", "13:5"],
                                      "inNested": ["12:7:5", "13:7:5"]}
    for shown in report["beforeQueue"].values():
        assert shown["state"] == "idle" and set(shown["fields"].values()) == {"–"}
    assert report["boundPrompts"] == {"onRoot": ["prompt-s"], "inSubgraph": ["prompt-s"], "inNested": ["prompt-s"]}
    running = report["running"]
    assert running["onRoot"]["fields"]["step"] == "4 / 10"
    assert running["inSubgraph"]["fields"]["step"] == "6 / 10"
    assert running["inNested"]["fields"]["step"] == "8 / 10"
    assert all(shown["state"] == "running" for shown in running.values())
    stopped = report["nestedStopped"]
    assert stopped["inNested"]["state"] == "stopped" and stopped["inNested"]["fields"]["eta"] == "–"
    assert stopped["onRoot"]["state"] == stopped["inSubgraph"]["state"] == "running"
    second = report["secondInstance"]
    assert second["inSubgraph"]["fields"]["step"] == "2 / 10"            # the newest run of its instances
    assert second["onRoot"]["fields"]["step"] == "4 / 10" and second["inNested"]["state"] == "stopped"
    posts = [call["body"] for call in report["calls"] if call["method"] == "POST"]
    assert posts == [{"node": "13:5", "run": "run-sub-13", "action": "save_now"}]
    assert report["afterSubgraphClick"]["inSubgraph"]["message"] == "harness accepted save_now"
    assert report["afterSubgraphClick"]["onRoot"]["message"] == ""             # no notice on the root graph's node
