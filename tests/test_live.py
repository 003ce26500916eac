"""nodes/live.py (LiveReporter messages + throttle, the state store), nodes/live_routes.py (the two routes), and the
recorded fixtures."""
import asyncio
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from comfyui_dreambooth.nodes import comfy_compat, live, live_routes, paths
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
    assert live_routes.state_response() == (200, {"nodes": {}, "runs": []})
    make_reporter("3")
    status, body = live_routes.state_response("3")
    assert status == 200 and body["node"] == "3"
    status, body = live_routes.state_response(None)
    assert status == 200 and set(body["nodes"]) == {"3"}
    status, body = live_routes.state_response("4")
    assert status == 404 and "node '4'" in body["error"]


def test_every_message_and_the_state_name_the_prompt_that_started_the_run():
    """Issue 23.1: node ids repeat across workflows; the prompt id tells a panel whether the run is its own."""
    reporter, sent, clock = make_reporter("5", prompt_id="prompt-a")
    reporter.progress(1, 4, epoch=1, loss=0.5, lr=1e-4, it_per_s=1.0, eta_s=3.0)
    reporter.preview([{"filename": "p.png", "subfolder": "", "type": "output"}])
    reporter.status("done", "finished")
    assert {event for event, _ in sent} == {live.STATUS_EVENT, live.PROGRESS_EVENT, live.PREVIEW_EVENT}
    assert all(data["prompt"] == "prompt-a" for _, data in sent), sent
    assert live.get_state("5")["prompt"] == "prompt-a"
    assert make_reporter("6")[0].snapshot()["prompt"] is None      # headless: no prompt


def test_runs_of_the_same_node_id_from_other_workflows_are_all_kept(monkeypatch):
    """Issue 23.1: workflow A's node 5 trained, then workflow B's node 5: A's panel still finds A's run (by its
    prompt) in GET /dreambooth/state; the latest run of each node stays the one controls act on."""
    monkeypatch.setattr(live, "send_ui_message", lambda e, d: None)
    first, _, _ = make_reporter("5", prompt_id="prompt-a")
    first.status("done", "finished")
    second, _, _ = make_reporter("5", prompt_id="prompt-b")
    status, body = live_routes.state_response()
    assert status == 200 and [(s["run"], s["prompt"]) for s in body["runs"]] == [(first.run, "prompt-a"),
                                                                                  (second.run, "prompt-b")]
    assert body["nodes"]["5"]["run"] == second.run
    assert live_routes.control_response({"node": "5", "run": first.run, "action": "save_now"})[0] == 409
    assert live_routes.control_response({"node": "5", "run": second.run, "action": "save_now"})[0] == 200


def test_a_node_inside_a_subgraph_is_reported_and_controlled_by_its_execution_id(monkeypatch):
    """Issue 23: inside a subgraph ComfyUI runs the Train node 5 of the subgraph that node 12 instantiates as "12:5"
    (UNIQUE_ID); every message, the state and the control route name it so, apart from node 5 of the root graph,
    which is what web/dreambooth.js binds the panel of the node in the subgraph to."""
    monkeypatch.setattr(live, "send_ui_message", lambda e, d: None)
    on_root, _, _ = make_reporter("5", prompt_id="prompt-s")
    inner, sent, _ = make_reporter("12:5", prompt_id="prompt-s")
    nested, _, _ = make_reporter("12:7:5", prompt_id="prompt-s")
    inner.progress(1, 4, epoch=1, loss=0.5, lr=1e-4, it_per_s=1.0, eta_s=3.0)
    inner.preview([{"filename": "p.png", "subfolder": "", "type": "output"}])
    inner.status("saving", "saving")
    assert sent and all(data["node"] == "12:5" and data["run"] == inner.run for _, data in sent)
    assert live.get_state("12:5")["run"] == inner.run and live.get_state("5")["run"] == on_root.run
    assert live.get_state("12:7:5")["run"] == nested.run
    assert live_routes.state_response("12:5") == (200, live.get_state("12:5"))
    assert live_routes.control_response({"node": "12:5", "run": inner.run, "action": "stop_now"})[0] == 200
    assert inner.control.should_stop(epoch_end=False) and not on_root.control.should_stop(epoch_end=False)
    assert live_routes.control_response({"node": "5", "run": inner.run, "action": "save_now"})[0] == 409
    assert live_routes.control_response({"node": "12:7:5", "run": nested.run, "action": "save_now"})[0] == 200
    assert nested.control.take_save_request() and not on_root.control.take_save_request()


def test_kept_runs_are_bounded_but_each_nodes_latest_stays():
    reporters = [make_reporter(str(i % 3), prompt_id=f"p{i}")[0] for i in range(live.MAX_KEPT_RUNS + 10)]
    runs = [s["run"] for s in live.get_runs()]
    assert len(runs) == live.MAX_KEPT_RUNS and runs == [r.run for r in reporters[-live.MAX_KEPT_RUNS:]]
    keeper = make_reporter("keep", prompt_id="k")[0]
    for i in range(live.MAX_KEPT_RUNS + 3):
        make_reporter(f"other{i}")
    assert keeper.run in [s["run"] for s in live.get_runs()]      # still the latest of its node


def test_save_now_is_confirmed_on_the_panel_when_the_checkpoint_is_written(monkeypatch):
    """Issue 23.3: the notice "Save requested: ..." stayed for the rest of the run; the "saved" line reached only
    the console. Taking the request shows "saving", the trainer's next word (after the write) "saved step N"."""
    monkeypatch.setattr(live, "send_ui_message", lambda e, d: None)
    reporter, sent, clock = make_reporter("5")
    reporter.progress(1, 10, epoch=1, loss=0.5)
    reporter.progress(2, 10, epoch=1, loss=0.4)
    assert live_routes.control_response({"node": "5", "run": reporter.run, "action": "save_now"})[0] == 200
    assert not reporter.trainer_control.should_stop(epoch_end=True)        # the other flags are the run's own
    del sent[:]
    assert reporter.trainer_control.take_save_request()                     # the trainer writes it now
    assert [(d["state"], d["message"]) for d in events(sent, live.STATUS_EVENT)] == [
        ("saving", "saving a checkpoint at step 2…")]
    assert events(sent, live.STATUS_EVENT)[0]["control"]["save_requested"] is False
    reporter.stage("saved /runs/x/checkpoints/step-0000002 (requested)")   # the trainer's next word
    assert [(d["state"], d["message"]) for d in events(sent, live.STATUS_EVENT)][1:] == [("running", "saved step 2")]
    assert live.get_state("5")["message"] == "saved step 2"
    reporter.progress(3, 10, epoch=1, loss=0.3)
    assert len(events(sent, live.STATUS_EVENT)) == 2                         # confirmed once
    assert not reporter.trainer_control.take_save_request()                 # one click, one checkpoint


def test_a_failed_requested_save_is_not_confirmed(monkeypatch):
    reporter, sent, _ = make_reporter("5")
    reporter.progress(4, 10, loss=0.5)
    reporter.control.request_save()
    assert reporter.trainer_control.take_save_request()
    reporter.status("error", "could not save the checkpoint of step 4")
    reporter.stage("anything")
    assert [d["message"] for d in events(sent, live.STATUS_EVENT)][-2:] == [
        "saving a checkpoint at step 4…", "could not save the checkpoint of step 4"]


def test_progress_carries_the_epoch_count_and_the_imagic_stage():
    """Issue 23.6: Imagic's stage (embedding / UNet) was sent by the trainer but dropped before the panel."""
    reporter, sent, clock = make_reporter("5")
    reporter.progress(3, 10, epoch=1, loss=0.2, epochs=2, stage="embedding")
    clock.t += 1
    reporter.progress(8, 10, epoch=2, loss=0.1, epochs=2, stage="unet")
    assert [(d["epoch"], d["epochs"], d["stage"]) for d in events(sent, live.PROGRESS_EVENT)] == [
        (1, 2, "embedding"), (2, 2, "unet")]
    assert live.get_state("5")["stage"] == "unet" and live.get_state("5")["epochs"] == 2
    reporter.progress(9, 10, epoch=3, loss=0.1)
    assert live.get_state("5")["stage"] is None


def test_a_resumed_run_starts_its_chart_with_the_earlier_steps():
    reporter, sent, _ = make_reporter("5")
    reporter.resumed([[1, 0.5], [2, "nan"], [3, 0.3]])
    reporter.progress(4, 10, epoch=1, loss=0.2)
    assert events(sent, live.PROGRESS_EVENT)[0]["points"] == [[1, 0.5], [3, 0.3], [4, 0.2]]
    assert live.get_state("5")["loss_history"] == [[1, 0.5], [3, 0.3], [4, 0.2]]


def test_current_prompt_id_inside_comfyui(monkeypatch):
    from comfyui_dreambooth.nodes import comfy_compat

    assert comfy_compat.current_prompt_id() is None                 # headless
    server = types.ModuleType("server")
    instance = types.SimpleNamespace(last_prompt_id="from-server")
    server.PromptServer = type("PromptServer", (), {"instance": instance})
    for name in ("folder_paths", "comfy"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "server", server)
    assert comfy_compat.current_prompt_id() == "from-server"        # ComfyUI without comfy_execution.utils
    utils = types.ModuleType("comfy_execution.utils")
    utils.get_executing_context = lambda: types.SimpleNamespace(prompt_id="from-context", node_id="5")
    monkeypatch.setitem(sys.modules, "comfy_execution.utils", utils)
    assert comfy_compat.current_prompt_id() == "from-context"


def test_control_response_sets_the_flags_and_tells_every_tab(monkeypatch):
    broadcast = []
    monkeypatch.setattr(live, "send_ui_message", lambda e, d: broadcast.append((e, d)))
    reporter, _, _ = make_reporter("3")
    status, body = live_routes.control_response({"node": "3", "run": reporter.run, "action": "save_now"})
    assert status == 200 and body["ok"] and body["control"]["save_requested"] and body["run"] == reporter.run
    assert reporter.control.take_save_request()
    status, body = live_routes.control_response({"node": 3, "run": reporter.run, "action": "stop_after_epoch"})
    assert status == 200 and "end of this epoch" in body["message"]
    assert reporter.control.should_stop(epoch_end=True) and not reporter.control.should_stop(epoch_end=False)
    assert broadcast[-1][0] == live.STATUS_EVENT and broadcast[-1][1]["control"]["stop_after_epoch"]
    assert broadcast[-1][1]["run"] == reporter.run
    live_routes.control_response({"node": "3", "run": reporter.run, "action": "stop_now"})
    assert reporter.control.should_stop(epoch_end=False)


@pytest.mark.parametrize("payload, status, fragment", [
    (None, 400, "JSON object"),
    ([], 400, "JSON object"),
    ({"action": "save_now"}, 400, "missing 'node'"),
    ({"node": "3", "action": "save_now"}, 400, "missing 'run'"),
    ({"node": "3", "run": "r3", "action": "explode"}, 400, "save_now, stop_after_epoch, stop_now"),
    ({"node": "404", "run": "r3", "action": "save_now"}, 404, "no training run is active for node '404'"),
])
def test_control_response_errors(payload, status, fragment):
    make_reporter("3", run_id="r3")
    got_status, body = live_routes.control_response(payload)
    assert got_status == status and fragment in body["error"]


def test_control_after_the_run_ended_is_404():
    reporter, _, _ = make_reporter("3")
    reporter.status("done")
    status, body = live_routes.control_response({"node": "3", "run": reporter.run, "action": "save_now"})
    assert status == 404 and "has ended" in body["error"]


def test_register_routes_is_a_no_op_outside_comfyui(monkeypatch):
    monkeypatch.setattr(live_routes, "_routes_registered", False)
    assert live_routes.register_routes() is False


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


class FakeStream:
    """aiohttp's request.content: read(n) gives at most n bytes (here also at most `chunk` per call)."""

    def __init__(self, data: bytes, chunk: int = 1000):
        self.data, self.chunk, self.given = data, chunk, 0

    async def read(self, n=-1):
        n = len(self.data) if n < 0 else n
        part = self.data[self.given:self.given + min(n, self.chunk)]
        self.given += len(part)
        return part


class FakeRequest:
    """What the handlers use of an aiohttp request. `body` is JSON-encoded unless `raw` bytes are given;
    `length=None` is a chunked body (no Content-Length)."""

    def __init__(self, query=None, body=None, raw=None, content_type="application/json", length="auto"):
        self.rel_url = types.SimpleNamespace(query=query or {})
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else b"")
        self.content = FakeStream(data)
        self.content_type = content_type
        self.content_length = len(data) if length == "auto" else length


def fake_route_table(monkeypatch) -> "FakeRoutes":
    """A (fake) ComfyUI with a fake aiohttp.web, routes not registered yet: the table register_routes fills."""
    routes = FakeRoutes()
    fake_comfyui(monkeypatch, routes=routes, send_sync=lambda *a, **k: None)
    fake_aiohttp = types.ModuleType("aiohttp")
    fake_web = types.ModuleType("aiohttp.web")
    fake_web.json_response = lambda body, status=200, headers=None: {"status": status, "body": body,
                                                                      "headers": headers or {}}
    fake_aiohttp.web = fake_web
    monkeypatch.setitem(sys.modules, "aiohttp", fake_aiohttp)
    monkeypatch.setitem(sys.modules, "aiohttp.web", fake_web)
    monkeypatch.setattr(live_routes, "_routes_registered", False)
    return routes


def test_register_routes_inside_comfyui(monkeypatch):
    routes = fake_route_table(monkeypatch)
    assert live_routes.register_routes() is True
    routes.handlers.clear()
    assert live_routes.register_routes() is True            # idempotent: no second registration
    assert routes.handlers == {}
    monkeypatch.setattr(live_routes, "_routes_registered", False)
    live_routes.register_routes()
    assert set(routes.handlers) == {("GET", "/dreambooth/state"), ("POST", "/dreambooth/control")}

    reporter, _, _ = make_reporter("5")
    get_state, post_control = routes.handlers[("GET", "/dreambooth/state")], routes.handlers[("POST", "/dreambooth/control")]
    response = asyncio.run(get_state(FakeRequest(query={"node": "5"})))
    assert response["status"] == 200 and response["body"]["run"] == reporter.run
    response = asyncio.run(get_state(FakeRequest()))
    assert set(response["body"]["nodes"]) == {"5"}
    response = asyncio.run(post_control(FakeRequest(body={"node": "5", "run": reporter.run,
                                                          "action": "stop_after_epoch"})))
    assert response["status"] == 200 and reporter.control.stop_requested
    response = asyncio.run(post_control(FakeRequest(raw=b"not json")))
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
    assert json.loads((HARNESS / "state.json").read_text()) == record_messages.state_body(state)
    types_seen = {m["type"] for m in messages}
    assert types_seen == {live.PROGRESS_EVENT, live.PREVIEW_EVENT, live.STATUS_EVENT}
    assert len(messages) < 150                       # 300 steps at 10 it/s, throttled to <= 4/s


def test_module_is_cheap_to_import():
    code = ("import sys, comfyui_dreambooth; before = set(sys.modules); "
            "import comfyui_dreambooth.nodes.live, comfyui_dreambooth.nodes.live_routes; "
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


# --- issue 10.3: the routes assume nothing of the caller ---------------------------------------------------------
def installed_routes(monkeypatch):
    """(GET state handler, POST control handler) as registered inside a (fake) ComfyUI with a fake aiohttp.web."""
    routes = fake_route_table(monkeypatch)
    assert live_routes.register_routes()
    return routes.handlers[("GET", "/dreambooth/state")], routes.handlers[("POST", "/dreambooth/control")]


def post(handler, request):
    response = asyncio.run(handler(request))
    json.dumps(response["body"], allow_nan=False)
    return response


def test_control_names_the_run_a_stale_tab_gets_409_and_touches_nothing(monkeypatch):
    broadcast = []
    monkeypatch.setattr(live, "send_ui_message", lambda e, d: broadcast.append((e, d)))
    first, _, _ = make_reporter("3", run_id="run-a")
    first.status("stopped", "stopped after epoch 1")          # the tab that showed run-a stays open...
    second, _, _ = make_reporter("3", run_id="run-b")         # ...while the node trains run-b
    for action in ("stop_now", "stop_after_epoch", "save_now"):
        status, body = live_routes.control_response({"node": "3", "run": "run-a", "action": action})
        assert status == 409 and "stale run id 'run-a'" in body["error"], body
    assert second.control.snapshot() == {"save_requested": False, "stop_after_epoch": False, "stop_now": False}
    assert broadcast == []
    status, body = live_routes.control_response({"node": "3", "run": "run-b", "action": "stop_now"})
    assert status == 200 and second.control.should_stop(epoch_end=False)
    # a guessed node id, or a guessed run id on a node that never trained: 404 either way, nothing set anywhere
    status, body = live_routes.control_response({"node": "4", "run": "run-b", "action": "stop_now"})
    assert status == 404 and find_control("4") is None
    second.status("done")
    status, body = live_routes.control_response({"node": "3", "run": "run-b", "action": "save_now"})
    assert status == 404 and "run 'run-b' of node '3' has ended" in body["error"]


def test_repeated_stop_requests_are_told_to_the_tabs_once(monkeypatch):
    broadcast = []
    monkeypatch.setattr(live, "send_ui_message", lambda e, d: broadcast.append((e, d)))
    reporter, _, _ = make_reporter("3")
    for _ in range(50):
        status, _ = live_routes.control_response({"node": "3", "run": reporter.run, "action": "stop_after_epoch"})
        assert status == 200
    assert len(broadcast) == 1


def test_save_now_is_rate_limited_per_run(monkeypatch):
    monkeypatch.setattr(live, "send_ui_message", lambda e, d: None)
    reporter, _, clock = make_reporter("3", save_interval_s=30)
    request = {"node": "3", "run": reporter.run, "action": "save_now"}
    assert live_routes.control_response(request)[0] == 200
    status, body = live_routes.control_response(request)                   # the first one is not written yet
    assert status == 429 and "already requested" in body["error"] and body["retry_after_s"] >= 1
    assert reporter.control.take_save_request() and not reporter.control.take_save_request()   # one checkpoint
    clock.t += 10
    status, body = live_routes.control_response(request)                   # written, but only 10 s ago
    assert status == 429 and "once every 30 s" in body["error"] and body["retry_after_s"] == 20
    assert not reporter.control.snapshot()["save_requested"]
    # stopping is never rate-limited (it ends the run)
    assert live_routes.control_response({**request, "action": "stop_after_epoch"})[0] == 200
    clock.t += 20
    assert live_routes.control_response(request)[0] == 200
    # a new run on the node starts with a clean slate
    fresh, _, _ = make_reporter("3", save_interval_s=30)
    assert live_routes.control_response({**request, "run": fresh.run})[0] == 200


def test_save_now_rate_limit_reaches_the_client_with_retry_after(monkeypatch):
    _, post_control = installed_routes(monkeypatch)
    reporter, _, clock = make_reporter("5", save_interval_s=30)
    body = {"node": "5", "run": reporter.run, "action": "save_now"}
    assert post(post_control, FakeRequest(body=body))["status"] == 200
    reporter.control.take_save_request()
    clock.t += 12
    response = post(post_control, FakeRequest(body=body))
    assert response["status"] == 429 and response["headers"] == {"Retry-After": "18"}
    assert "\n" not in response["body"]["error"]


@pytest.mark.parametrize("payload, fragment", [
    ({"node": ["5"], "run": "r", "action": "save_now"}, "'node' must be a string, not list"),
    ({"node": {"id": 5}, "run": "r", "action": "save_now"}, "'node' must be a string, not dict"),
    ({"node": True, "run": "r", "action": "save_now"}, "'node' must be a string, not bool"),
    ({"node": 5.0, "run": "r", "action": "save_now"}, "'node' must be a string, not float"),
    ({"node": "5", "run": ["r"], "action": "save_now"}, "'run' must be a string, not list"),
    ({"node": "5", "run": "r", "action": ["save_now"]}, "unknown action ['save_now']"),
    ({"node": "5", "run": "r", "action": {"save_now": 1}}, "unknown action"),
    ({"node": "5", "run": "r"}, "unknown action None"),
    ({"node": "5" * 2_000, "run": "r", "action": "save_now"}, "'node' is longer than 64 characters"),
    ({"node": "5", "run": "r" * 2_000, "action": "save_now"}, "'run' is longer than 64 characters"),
    ({"node": "5", "run": "r", "action": "x" * 2_000}, "expected one of save_now"),
    ("save_now", "must be a JSON object"),
    (5, "must be a JSON object"),
])
def test_control_bodies_of_the_wrong_shape_get_400_in_one_short_line(monkeypatch, payload, fragment):
    _, post_control = installed_routes(monkeypatch)
    reporter, _, _ = make_reporter("5", run_id="r")
    response = post(post_control, FakeRequest(body=payload))
    assert response["status"] == 400 and fragment in response["body"]["error"], response
    assert "\n" not in response["body"]["error"] and len(response["body"]["error"]) < 300
    assert reporter.control.snapshot() == {"save_requested": False, "stop_after_epoch": False, "stop_now": False}


@pytest.mark.parametrize("request_kw, status, fragment", [
    ({"raw": b"{not json"}, 400, "not valid JSON"),
    ({"raw": b"node=5&action=stop_now"}, 400, "not valid JSON"),
    ({"raw": b'{"node": "5", "run": "r", "action": "stop_now"'}, 400, "not valid JSON"),
    ({"raw": b"\xff\xfe\x00garbage"}, 400, "not valid JSON"),
    ({"raw": b"[" * 2000 + b"]" * 2000, "length": None}, 400, "not valid JSON"),   # nesting deeper than JSON's limit
    ({"raw": b""}, 400, "empty body"),
    ({"raw": b'{"node": "5", "run": "r", "action": "stop_now"}', "content_type": "text/plain"}, 415,
     "'Content-Type: application/json'"),
    ({"raw": b'{"node": "5", "run": "r", "action": "stop_now"}', "content_type": ""}, 415, "no content type"),
    ({"raw": b'{"node": "5", "run": "r", "action": "stop_now"}',
      "content_type": "application/x-www-form-urlencoded"}, 415, "application/json"),
])
def test_bad_control_bodies_get_a_one_line_error_never_a_traceback(monkeypatch, request_kw, status, fragment):
    _, post_control = installed_routes(monkeypatch)
    reporter, _, _ = make_reporter("5", run_id="r")
    response = post(post_control, FakeRequest(**request_kw))
    assert response["status"] == status and fragment in response["body"]["error"], response
    error = response["body"]["error"]
    assert "\n" not in error and "Traceback" not in error and len(error) < 300
    assert not reporter.control.stop_requested


def test_huge_control_bodies_are_refused_without_reading_them(monkeypatch):
    _, post_control = installed_routes(monkeypatch)
    reporter, _, _ = make_reporter("5", run_id="r")
    huge = json.dumps({"node": "5", "run": "r", "action": "stop_now", "pad": "x" * 50_000_000}).encode()
    declared = FakeRequest(raw=huge)                      # Content-Length says it all: not a byte is read
    response = post(post_control, declared)
    assert response["status"] == 413 and "at most 4096" in response["body"]["error"]
    assert declared.content.given == 0
    chunked = FakeRequest(raw=huge, length=None)          # no Content-Length: read no further than the limit
    response = post(post_control, chunked)
    assert response["status"] == 413 and chunked.content.given <= live_routes.MAX_CONTROL_BODY_BYTES + 1
    assert not reporter.control.stop_requested
    fits = FakeRequest(body={"node": "5", "run": "r", "action": "stop_now"}, length=None)
    assert post(post_control, fits)["status"] == 200 and reporter.control.stop_requested


def test_route_bugs_answer_500_in_one_line(monkeypatch):
    get_state, post_control = installed_routes(monkeypatch)

    def broken(*args, **kwargs):
        raise RuntimeError("/home/someone/secret/path exploded")

    monkeypatch.setattr(live_routes, "control_response", broken)
    monkeypatch.setattr(live_routes, "state_response", broken)
    for response in (post(post_control, FakeRequest(body={"node": "5", "run": "r", "action": "stop_now"})),
                     post(get_state, FakeRequest())):
        assert response["status"] == 500 and "see the server log" in response["body"]["error"]
        assert "secret" not in json.dumps(response["body"])


def test_state_query_with_a_huge_node_id_gets_a_short_404(monkeypatch):
    get_state, _ = installed_routes(monkeypatch)
    response = post(get_state, FakeRequest(query={"node": "9" * 100_000}))
    assert response["status"] == 404 and len(response["body"]["error"]) < 300


# --- issue 10.3: no absolute paths outside ComfyUI's folders in the state or the messages -------------------------
@pytest.fixture
def folders(tmp_path):
    """Headless output and input folders under a path with a space (as in "/home/John Smith/ComfyUI")."""
    root = tmp_path / "Comfy UI"
    output, inputs = root / "output", root / "input"
    output.mkdir(parents=True)
    inputs.mkdir()
    with comfy_compat.using_output_directory(output):
        comfy_compat.set_input_directory(inputs)
        try:
            yield types.SimpleNamespace(root=root, output=output, input=inputs, tmp=tmp_path)
        finally:
            comfy_compat.set_input_directory(None)


def test_public_path(folders):
    assert paths.public_path(str(folders.output / "dreambooth" / "run-1")) == "output/dreambooth/run-1"
    assert paths.public_path(str(folders.output)) == "output"
    assert paths.public_path(str(folders.input / "dog" / "a b.png")) == "input/dog/a b.png"
    assert paths.public_path(str(folders.output / ".." / "secret" / "x.safetensors")) == "x.safetensors"
    assert paths.public_path("/home/someone/models/sd15.safetensors") == "sd15.safetensors"
    assert paths.public_path("C:\\Users\\someone\\sd15.safetensors") == "sd15.safetensors"
    assert paths.public_path("output/dreambooth/run-1") == "output/dreambooth/run-1"   # already relative
    assert paths.public_path("") == ""


def test_public_text_keeps_everything_but_absolute_paths(folders):
    message = (f"training 40 steps (8/epoch) in {folders.output}/dreambooth/dog run-1: 3/8, 2.5 it/s, "
               f"images from '{folders.input / 'dog'}', base /home/someone/private models/sd15.safetensors, "
               f"see https://example.org/a/b and C:\\Users\\someone\\x.ckpt; 5 / 10 done")
    text = paths.public_text(message)
    assert text == ("training 40 steps (8/epoch) in output/dreambooth/dog run-1: 3/8, 2.5 it/s, images from "
                    "'input/dog', base private models/sd15.safetensors, see https://example.org/a/b and x.ckpt; "
                    "5 / 10 done")
    assert str(folders.tmp) not in text and "someone" not in text
    assert paths.public_text("caching latents: 3/8") == "caching latents: 3/8"


def test_state_and_messages_show_no_absolute_paths(folders):
    sent = []
    run_dir = folders.output / "dreambooth" / "dog-20250101"
    reporter = live.LiveReporter("8", str(run_dir), send=lambda e, d: sent.append((e, d)))
    assert live.get_state("8")["run_dir"] == "output/dreambooth/dog-20250101"
    assert reporter.run_dir == str(run_dir)             # the node itself still knows where the run is
    reporter.stage(f"scanning {folders.input / 'dog'}")
    reporter.progress(1, 4, loss=0.5)
    reporter.preview([{"filename": "p.png", "subfolder": "dreambooth/dog-20250101/previews", "type": "output"},
                      {"filename": "q.png", "subfolder": str(run_dir / "previews"), "type": "output"},
                      {"filename": "r.png", "subfolder": "../../elsewhere/previews", "type": "output"},
                      {"filename": "../s.png", "subfolder": "", "type": "output"}])
    reporter.status("error", f"could not read /srv/private/base.safetensors: truncated (run folder {run_dir})")
    outside = folders.tmp / "elsewhere" / "run-9"
    reporter.run_dir = str(outside)                     # what TrainDreamBooth sets when the run is done
    state = live.get_state("8")
    assert state["run_dir"] == "run-9"
    assert state["message"] == ("could not read base.safetensors: truncated "
                                "(run folder output/dreambooth/dog-20250101)")
    assert state["previews"] == [{"filename": "p.png", "subfolder": "dreambooth/dog-20250101/previews",
                                  "type": "output"}]
    everything = json.dumps([state, sent, live_routes.state_response()[1]])
    assert str(folders.tmp) not in everything and "/srv/private" not in everything
    assert "input/dog" in everything


def test_paths_inside_comfyui_are_shown_relative_to_its_folders(monkeypatch, tmp_path):
    base = tmp_path / "ComfyUI"
    fake_comfyui(monkeypatch, send_sync=lambda *a, **k: None)
    folder_paths = sys.modules["folder_paths"]
    folder_paths.get_output_directory = lambda: str(base / "output")
    folder_paths.get_input_directory = lambda: str(base / "input")
    folder_paths.get_temp_directory = lambda: str(base / "temp")
    folder_paths.models_dir = str(base / "models")
    extra_loras = tmp_path / "big disk" / "loras"
    folder_paths.get_folder_paths = lambda kind: [str(base / "models" / kind)] + (
        [str(extra_loras)] if kind == "loras" else [])
    assert paths.public_path(str(base / "models" / "checkpoints" / "sd15.safetensors")) == \
        "models/checkpoints/sd15.safetensors"
    assert paths.public_path(str(extra_loras / "dog.safetensors")) == "models/loras/dog.safetensors"
    assert paths.public_path(str(base / "temp" / "preview.png")) == "temp/preview.png"
    assert paths.public_path(str(base / "output" / "dreambooth" / "r")) == "output/dreambooth/r"
    assert paths.public_path(str(base / "custom_nodes" / "x.py")) == "x.py"
    reporter = live.LiveReporter("8", str(base / "output" / "dreambooth" / "r"), send=lambda e, d: None)
    reporter.status("done", f"finished {base / 'output' / 'dreambooth' / 'r'}; LoRA {extra_loras / 'dog.safetensors'}")
    assert live.get_state("8")["message"] == "finished output/dreambooth/r; LoRA models/loras/dog.safetensors"


def test_a_half_working_comfyui_never_breaks_reporting(monkeypatch):
    fake_comfyui(monkeypatch, send_sync=lambda *a, **k: None)   # folder_paths without any function
    reporter = live.LiveReporter("8", "/somewhere/private/run-1", send=lambda e, d: None)
    reporter.status("error", "failed in /somewhere/private/run-1")
    state = live.get_state("8")
    assert state["run_dir"] == "run-1" and state["message"] == "failed in run-1"


def test_routes_in_a_real_aiohttp_server():
    """The same checks through aiohttp itself (ComfyUI's server library; installed wherever ComfyUI is), with
    ComfyUI's 100 MiB client_max_size: real headers, a charset in the content type, a chunked body."""
    aiohttp_web = pytest.importorskip("aiohttp.web")
    test_utils = pytest.importorskip("aiohttp.test_utils")

    routes = aiohttp_web.RouteTableDef()
    live_routes._add_routes(routes)
    app = aiohttp_web.Application(client_max_size=100 * 1024 * 1024)
    app.add_routes(routes)
    reporter, _, _ = make_reporter("5", save_interval_s=30)

    async def exchange():
        async with test_utils.TestClient(test_utils.TestServer(app)) as client:
            async def call(method, path, **kw):
                response = await client.request(method, path, **kw)
                return response.status, response.headers.get("Retry-After"), await response.json()

            request = {"node": "5", "run": reporter.run, "action": "save_now"}
            got = {"state": await call("GET", "/dreambooth/state", params={"node": "5"}),
                   "save": await call("POST", "/dreambooth/control", json=request),
                   "again": await call("POST", "/dreambooth/control", json=request),
                   "stale": await call("POST", "/dreambooth/control", json={**request, "run": "old"}),
                   "charset": await call("POST", "/dreambooth/control", headers={
                       "Content-Type": "application/json; charset=utf-8"},
                       data=json.dumps({**request, "action": "stop_after_epoch"}).encode()),
                   "form": await call("POST", "/dreambooth/control", data={"node": "5"}),
                   "huge": await call("POST", "/dreambooth/control", data=b"x" * 20_000_000,
                                      headers={"Content-Type": "application/json"})}

            async def chunks():
                for _ in range(1000):
                    yield b"x" * 10_000
            got["chunked"] = await call("POST", "/dreambooth/control", data=chunks(),
                                        headers={"Content-Type": "application/json"})
            return got

    got = asyncio.run(exchange())
    assert got["state"][0] == 200 and got["state"][2]["run"] == reporter.run
    assert got["save"][0] == 200 and got["again"][:2] == (429, "1")
    assert got["stale"][0] == 409 and got["charset"][0] == 200 and reporter.control.stop_requested
    assert got["form"][0] == 415 and got["huge"][0] == 413 and got["chunked"][0] == 413


def test_stage_lines_without_paths_cost_no_folder_lookups(monkeypatch):
    """The data preparation reports a stage line per item ("caching latents: 3/8"): no folder listing for those."""
    calls = []
    monkeypatch.setattr(comfy_compat, "public_folders", lambda: calls.append(1) or [])
    reporter, _, _ = make_reporter("8")
    calls.clear()                                   # (its run folder "/runs/x" was looked up once)
    for i in range(100):
        reporter.stage(f"caching latents (disk): {i}/100, 2.5 it/s")
    assert calls == [] and live.get_state("8")["message"] == "caching latents (disk): 99/100, 2.5 it/s"


def test_validation_losses_are_the_charts_second_curve():
    """Issue 20: each validation's subject loss goes out with the next progress message (val_points) and is in the
    state a reloaded page reads (validation_history); a run that does not validate sends neither."""
    reporter, sent, clock = make_reporter(min_interval_s=0.0)
    reporter.progress(1, 4, epoch=1, loss=0.5)
    assert "val_points" not in events(sent, live.PROGRESS_EVENT)[-1]
    assert "validation_history" not in reporter.snapshot()
    reporter.validation(2, 0.3)
    reporter.validation(3, float("nan"))                # not a point
    reporter.progress(2, 4, epoch=1, loss=0.4)
    assert events(sent, live.PROGRESS_EVENT)[-1]["val_points"] == [[2, 0.3]]
    reporter.progress(3, 4, epoch=1, loss=0.4)
    assert "val_points" not in events(sent, live.PROGRESS_EVENT)[-1]
    assert reporter.snapshot()["validation_history"] == [[2, 0.3]]
