"""nodes/live.py: LiveReporter messages + throttle, the state store, the two routes, and the recorded fixtures."""
import asyncio
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from comfyui_dreambooth.nodes import comfy_compat, live
from comfyui_dreambooth.training import control as control_module
from comfyui_dreambooth.training.control import find_control

HARNESS = Path(__file__).resolve().parent / "web_harness"


@pytest.fixture(autouse=True)
def clean_store():
    live.clear_states()
    control_module.controls.clear()
    yield
    live.clear_states()
    control_module.controls.clear()


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def make_reporter(node="7", **kw):
    sent = []
    clock = FakeClock()
    reporter = live.LiveReporter(node, "/runs/x", clock=clock, send=lambda e, d: sent.append((e, d)), **kw)
    return reporter, sent, clock


def events(sent, name):
    return [data for event, data in sent if event == name]


# --- loss history --------------------------------------------------------------------------------------------
def test_loss_history_keeps_everything_while_short():
    history = live.LossHistory(max_points=10)
    for step in range(1, 8):
        history.add(step, float(step))
    assert history.points() == [[s, float(s)] for s in range(1, 8)]
    assert history.stride == 1


def test_loss_history_downsamples_long_runs_evenly():
    history = live.LossHistory(max_points=100)
    for step in range(1, 1001):
        history.add(step, 1.0)
    points = history.points()
    assert len(points) <= 101
    assert history.stride > 1
    assert points[-1][0] == 1000                   # the newest step is always there
    assert all(p[1] == pytest.approx(1.0) for p in points)   # merging averages, never invents values
    gaps = {b[0] - a[0] for a, b in zip(points[:-2], points[1:-1])}
    assert gaps == {history.stride}                # uniform density, old and new


def test_loss_history_merge_is_a_mean():
    history = live.LossHistory(max_points=2)
    for step, loss in [(1, 1.0), (2, 3.0), (3, 5.0)]:
        history.add(step, loss)
    assert history.points() == [[2, 2.0], [3, 5.0]]


# --- reporter ------------------------------------------------------------------------------------------------
def test_new_reporter_announces_itself_and_registers_a_fresh_control():
    stale = control_module.get_control("7")
    stale.request_stop()
    reporter, sent, _ = make_reporter()
    assert sent[0][0] == live.STATUS_EVENT
    assert sent[0][1]["state"] == "starting" and sent[0][1]["node"] == "7" and sent[0][1]["run"] == reporter.run
    assert reporter.control is find_control("7") and reporter.control is not stale
    assert not reporter.control.stop_requested
    assert live.get_state("7")["state"] == "starting"


def test_progress_is_throttled_but_no_point_is_lost_and_last_step_is_sent():
    reporter, sent, clock = make_reporter(min_interval_s=0.25)
    total = 40
    for step in range(1, total + 1):
        clock.t += 0.05                             # 20 it/s -> throttled to <= 4 messages/s
        reporter.progress(step, total, epoch=1, loss=1.0 / step, lr=1e-4, it_per_s=20.0, eta_s=(total - step) / 20)
    progress = events(sent, live.PROGRESS_EVENT)
    assert len(progress) <= 2 + total * 0.05 / 0.25 + 1
    assert progress[-1]["step"] == total            # the last one always goes out
    sent_points = [p for message in progress for p in message["points"]]
    assert [p[0] for p in sent_points] == list(range(1, total + 1))
    assert progress[-1]["total"] == total and progress[-1]["lr"] == 1e-4 and progress[-1]["eta_s"] == 0.0
    assert progress[-1]["state"] == "running"


def test_status_flushes_pending_progress_first():
    reporter, sent, clock = make_reporter(min_interval_s=10)
    reporter.progress(1, 100, loss=0.5)
    reporter.progress(2, 100, loss=0.4)             # throttled
    assert events(sent, live.PROGRESS_EVENT)[-1]["step"] == 1
    reporter.status("stopped", "stopped after epoch 1")
    assert sent[-2][0] == live.PROGRESS_EVENT and sent[-2][1]["step"] == 2
    assert sent[-1][0] == live.STATUS_EVENT and sent[-1][1]["state"] == "stopped"
    assert live.get_state("7")["message"] == "stopped after epoch 1"


def test_first_training_step_replaces_the_preparation_message():
    """Issue 9: the panel kept "preparing the data (data): 8/8" for the whole run; the status line now says what
    is going on (the panel shows the last status message, progress messages carry none)."""
    reporter, sent, _ = make_reporter()
    reporter.status("starting", "preparing the data (data): 8/8")
    reporter.progress(1, 10, epoch=1, loss=0.5)
    state = live.get_state("7")
    assert (state["state"], state["message"]) == ("running", "training")
    status = events(sent, live.STATUS_EVENT)[-1]
    assert (status["state"], status["message"]) == ("running", "training")
    assert sent[-1][0] == live.STATUS_EVENT and sent[-2][0] == live.PROGRESS_EVENT   # the step is drawn first
    count = len(events(sent, live.STATUS_EVENT))
    reporter.progress(2, 10, epoch=1, loss=0.4)
    assert len(events(sent, live.STATUS_EVENT)) == count          # announced once, not per step
    reporter.status("sampling", "sampling previews")
    reporter.status("running", "")                                # messages set while running are the node's
    reporter.progress(3, 10, epoch=1, loss=0.3)
    assert live.get_state("7")["message"] == ""


def test_terminal_status_releases_the_control():
    reporter, _, _ = make_reporter()
    reporter.status("running")
    assert find_control("7") is reporter.control
    reporter.status("done", "finished")
    assert find_control("7") is None
    assert live.get_state("7")["control"] is None


def test_unknown_state_is_rejected():
    reporter, _, _ = make_reporter()
    with pytest.raises(ValueError, match="running"):
        reporter.status("exploded")


def test_nan_loss_is_reported_as_text_and_kept_out_of_the_chart():
    reporter, sent, _ = make_reporter()
    reporter.progress(1, 10, loss=float("nan"), lr=float("inf"))
    message = events(sent, live.PROGRESS_EVENT)[-1]
    assert message["loss"] == "nan" and message["lr"] == "inf" and message["points"] == []
    json.dumps(sent, allow_nan=False)               # the browser's JSON.parse rejects NaN
    json.dumps(live.get_state("7"), allow_nan=False)


def test_missing_numbers_are_none():
    reporter, sent, _ = make_reporter()
    reporter.progress(3)
    message = events(sent, live.PROGRESS_EVENT)[-1]
    assert message["step"] == 3
    assert all(message[k] is None for k in ("total", "epoch", "loss", "lr", "it_per_s", "eta_s"))


def test_preview_keeps_clean_image_refs():
    reporter, sent, _ = make_reporter()
    reporter.progress(12, 100, loss=0.1)
    reporter.preview([{"filename": "a.png", "subfolder": "p", "type": "temp"}, {"filename": "b.png"},
                      {"subfolder": "no-file"}, "junk"])
    message = events(sent, live.PREVIEW_EVENT)[-1]
    assert message["step"] == 12
    assert message["images"] == [{"filename": "a.png", "subfolder": "p", "type": "temp"},
                                 {"filename": "b.png", "subfolder": "", "type": "output"}]
    assert live.get_state("7")["previews"] == message["images"]
    many = [{"filename": f"{i}.png"} for i in range(20)]
    reporter.preview(many, step=50)
    assert len(live.get_state("7")["previews"]) == live.MAX_PREVIEWS


def test_state_holds_everything_a_reloaded_page_needs():
    reporter, _, clock = make_reporter(max_history_points=50)
    for step in range(1, 201):
        clock.t += 1
        reporter.progress(step, 400, epoch=2, loss=0.2, lr=5e-5, it_per_s=1.5, eta_s=133.0)
    reporter.preview([{"filename": "p.png", "subfolder": "", "type": "output"}])
    state = live.get_state("7")
    for key in ("node", "run", "run_dir", "state", "message", "step", "total", "epoch", "loss", "lr", "it_per_s",
                "eta_s", "loss_history", "history_stride", "previews", "preview_step", "control", "updated"):
        assert key in state, key
    assert state["step"] == 200 and state["total"] == 400 and state["state"] == "running"
    assert len(state["loss_history"]) <= 51 and state["loss_history"][-1][0] == 200
    assert state["control"] == {"save_requested": False, "stop_after_epoch": False, "stop_now": False}
    state["loss_history"].clear()                   # a copy: callers cannot corrupt the store
    assert live.get_state("7")["loss_history"]
    assert set(live.get_state()) == {"7"}
    assert live.get_state("nope") is None


def test_send_failures_never_reach_the_trainer(monkeypatch):
    def broken(event, data):
        raise ConnectionError("websocket gone")
    monkeypatch.setattr(comfy_compat, "send_ui_message", broken)
    reporter = live.LiveReporter("1", "")          # default transport
    reporter.progress(1, 2, loss=0.1)              # no exception
    reporter.status("done")


def test_default_transport_headless_goes_to_ui_listeners_only():
    received = []
    remove = comfy_compat.add_ui_listener(lambda event, data: received.append((event, data)))
    try:
        reporter = live.LiveReporter("9", "")
        reporter.progress(1, 2, loss=0.3)
        reporter.status("done")
    finally:
        remove()
    # starting, the first step, "running: training" (the first step ends the preparation message), done
    assert [event for event, _ in received] == [live.STATUS_EVENT, live.PROGRESS_EVENT, live.STATUS_EVENT,
                                                live.STATUS_EVENT]
    assert all(data["node"] == "9" for _, data in received)
    assert live.get_state("9")["state"] == "done"


def fake_comfyui(monkeypatch, **instance_attrs):
    """Pretend to run inside ComfyUI: its modules loaded, PromptServer.instance with the given attributes."""
    fake_server = types.ModuleType("server")
    fake_server.PromptServer = type("PromptServer", (), {})
    fake_server.PromptServer.instance = types.SimpleNamespace(**instance_attrs)
    monkeypatch.setitem(sys.modules, "server", fake_server)
    monkeypatch.setitem(sys.modules, "folder_paths", types.ModuleType("folder_paths"))
    monkeypatch.setitem(sys.modules, "comfy", types.ModuleType("comfy"))


def test_default_transport_inside_comfyui_uses_prompt_server(monkeypatch):
    calls = []
    fake_comfyui(monkeypatch, send_sync=lambda event, data, sid=None: calls.append((event, data)))
    live.LiveReporter("11", "").status("running", "go")
    assert [(e, d["state"]) for e, d in calls] == [(live.STATUS_EVENT, "starting"), (live.STATUS_EVENT, "running")]
    assert all(d["node"] == "11" for _, d in calls)


# --- routes --------------------------------------------------------------------------------------------------
def test_state_response():
    assert live.state_response() == (200, {"nodes": {}})
    make_reporter("3")
    status, body = live.state_response("3")
    assert status == 200 and body["node"] == "3"
    status, body = live.state_response(None)
    assert status == 200 and set(body["nodes"]) == {"3"}
    status, body = live.state_response("4")
    assert status == 404 and "node '4'" in body["error"]


def test_control_response_sets_the_flags_and_tells_every_tab(monkeypatch):
    broadcast = []
    monkeypatch.setattr(live, "_send_ui_message", lambda e, d: broadcast.append((e, d)))
    reporter, _, _ = make_reporter("3")
    status, body = live.control_response({"node": "3", "action": "save_now"})
    assert status == 200 and body["ok"] and body["control"]["save_requested"]
    assert reporter.control.take_save_request()
    status, body = live.control_response({"node": 3, "action": "stop_after_epoch"})
    assert status == 200 and "end of this epoch" in body["message"]
    assert reporter.control.should_stop(epoch_end=True) and not reporter.control.should_stop(epoch_end=False)
    assert broadcast[-1][0] == live.STATUS_EVENT and broadcast[-1][1]["control"]["stop_after_epoch"]
    assert broadcast[-1][1]["run"] == reporter.run
    live.control_response({"node": "3", "action": "stop_now"})
    assert reporter.control.should_stop(epoch_end=False)


@pytest.mark.parametrize("payload, status, fragment", [
    (None, 400, "JSON object"),
    ([], 400, "JSON object"),
    ({"action": "save_now"}, 400, "missing 'node'"),
    ({"node": "3", "action": "explode"}, 400, "save_now, stop_after_epoch, stop_now"),
    ({"node": "404", "action": "save_now"}, 404, "no training run is active for node '404'"),
])
def test_control_response_errors(payload, status, fragment):
    make_reporter("3")
    got_status, body = live.control_response(payload)
    assert got_status == status and fragment in body["error"]


def test_control_after_the_run_ended_is_404():
    reporter, _, _ = make_reporter("3")
    reporter.status("done")
    status, body = live.control_response({"node": "3", "action": "save_now"})
    assert status == 404


def test_register_routes_is_a_no_op_outside_comfyui(monkeypatch):
    monkeypatch.setattr(live, "_routes_registered", False)
    assert live.register_routes() is False


class FakeRoutes:
    def __init__(self):
        self.handlers = {}

    def _add(self, method, path):
        def decorate(handler):
            self.handlers[(method, path)] = handler
            return handler
        return decorate

    def get(self, path):
        return self._add("GET", path)

    def post(self, path):
        return self._add("POST", path)


class FakeRequest:
    def __init__(self, query=None, body=None, bad_json=False):
        self.rel_url = types.SimpleNamespace(query=query or {})
        self._body, self._bad = body, bad_json

    async def json(self):
        if self._bad:
            raise ValueError("not json")
        return self._body


def test_register_routes_inside_comfyui(monkeypatch):
    routes = FakeRoutes()
    fake_comfyui(monkeypatch, routes=routes, send_sync=lambda *a, **k: None)
    fake_aiohttp = types.ModuleType("aiohttp")
    fake_web = types.ModuleType("aiohttp.web")
    fake_web.json_response = lambda body, status=200: {"status": status, "body": body}
    fake_aiohttp.web = fake_web
    monkeypatch.setitem(sys.modules, "aiohttp", fake_aiohttp)
    monkeypatch.setitem(sys.modules, "aiohttp.web", fake_web)
    monkeypatch.setattr(live, "_routes_registered", False)

    assert live.register_routes() is True
    routes.handlers.clear()
    assert live.register_routes() is True            # idempotent: no second registration
    assert routes.handlers == {}
    monkeypatch.setattr(live, "_routes_registered", False)
    live.register_routes()
    assert set(routes.handlers) == {("GET", "/dreambooth/state"), ("POST", "/dreambooth/control")}

    reporter, _, _ = make_reporter("5")
    get_state, post_control = routes.handlers[("GET", "/dreambooth/state")], routes.handlers[("POST", "/dreambooth/control")]
    response = asyncio.run(get_state(FakeRequest(query={"node": "5"})))
    assert response["status"] == 200 and response["body"]["run"] == reporter.run
    response = asyncio.run(get_state(FakeRequest()))
    assert set(response["body"]["nodes"]) == {"5"}
    response = asyncio.run(post_control(FakeRequest(body={"node": "5", "action": "stop_after_epoch"})))
    assert response["status"] == 200 and reporter.control.stop_requested
    response = asyncio.run(post_control(FakeRequest(bad_json=True)))
    assert response["status"] == 400


# --- fixtures for the browser harness ------------------------------------------------------------------------
def test_recorded_fixtures_match_what_the_reporter_sends():
    """The JS harness replays messages.json/state.json; they must be what LiveReporter really produces.
    If this fails after a deliberate format change: /tmp/venv/bin/python tests/web_harness/record_messages.py"""
    sys.path.insert(0, str(HARNESS))
    try:
        import record_messages
    finally:
        sys.path.remove(str(HARNESS))
    messages, state = record_messages.record()
    assert json.loads((HARNESS / "messages.json").read_text()) == messages
    assert json.loads((HARNESS / "state.json").read_text()) == {"nodes": {record_messages.NODE_ID: state}}
    types_seen = {m["type"] for m in messages}
    assert types_seen == {live.PROGRESS_EVENT, live.PREVIEW_EVENT, live.STATUS_EVENT}
    assert len(messages) < 150                       # 300 steps at 10 it/s, throttled to <= 4/s


def test_module_is_cheap_to_import():
    code = ("import sys, comfyui_dreambooth; before = set(sys.modules); "
            "import comfyui_dreambooth.nodes.live; "
            "heavy = {'torch', 'diffusers', 'transformers', 'aiohttp'} & (set(sys.modules) - before); "
            "print(sorted(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_snapshots_while_training_are_consistent():
    """The server thread reads states while the training thread reports; every snapshot must be coherent."""
    import threading

    reporter = live.LiveReporter("12", "", send=lambda e, d: None, max_history_points=64)
    done = threading.Event()
    problems = []

    def read():
        while not done.is_set():
            state = live.get_state("12")
            steps = [p[0] for p in state["loss_history"]]
            if steps != sorted(steps) or (steps and steps[-1] > state["step"]):
                problems.append((steps[-3:], state["step"]))

    reader = threading.Thread(target=read)
    reader.start()
    for step in range(1, 5001):
        reporter.progress(step, 5000, loss=1.0)
    done.set()
    reader.join()
    assert problems == []
    assert live.get_state("12")["loss_history"][-1][0] == 5000
