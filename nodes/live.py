"""Live training state for the web panel: progress/preview/status messages, the state store and two routes.

The TrainDreamBooth node creates one `LiveReporter(node_id, run_dir, prompt_id=...)` per run and hands its `.control`
(a `training.control.TrainingControl`) to the trainer. The reporter
  * keeps the latest full state of the run (loss history, downsampled when long; lr, step/total, it/s, ETA,
    latest previews, state) in a module-level store, so a page reloaded mid-run can fetch it
    (GET /dreambooth/state), and
  * sends ComfyUI messages ("dreambooth.progress", "dreambooth.preview", "dreambooth.status", each carrying
    "node", "run" and "prompt": the id of the ComfyUI prompt that started the run) that web/dreambooth.js draws.
    A panel shows only the runs of prompts its own workflow queued: node ids repeat across workflows. Progress messages are throttled (at most one per
    `min_interval_s`) but the points skipped in between travel with the next one, and the last step is always
    sent.
POST /dreambooth/control {node, run, action} turns the panel's buttons into TrainingControl requests.

A ComfyUI server is often reachable by others, so the routes assume nothing of the caller: a control request names
the run it means (a stale tab gets 409, an unknown node or an ended run 404, never another run's stop), Save now is
rate-limited per run (429), a body that is not a small JSON object is refused with one line (400/413/415), and
the state and messages name files only relative to ComfyUI's output/input/temp/model folders (anything else by
its last component), never by an absolute path.

Outside ComfyUI the messages go nowhere and `register_routes()` does nothing, so the headless runner and the
tests use the same code. Cheap to import: no torch, no aiohttp at module level.
"""
from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import uuid
from typing import Callable

from ..training.control import ACTIONS, find_control, new_control, release_control
from . import comfy_compat
from .paths import ABSOLUTE_PATH, public_path, public_text

log = logging.getLogger(__name__)

PROGRESS_EVENT = "dreambooth.progress"
PREVIEW_EVENT = "dreambooth.preview"
STATUS_EVENT = "dreambooth.status"

STATES = ("starting", "running", "saving", "sampling", "stopping", "done", "stopped", "error", "interrupted")
TERMINAL_STATES = frozenset({"done", "stopped", "error", "interrupted"})

MAX_HISTORY_POINTS = 1000      # loss points kept per run (older ones are merged pairwise when exceeded)
MAX_PREVIEWS = 8               # latest preview images kept per run
MIN_PROGRESS_INTERVAL_S = 0.25  # <= 4 progress messages per second
SAVE_REQUEST_MIN_INTERVAL_S = 30.0   # Save now: one accepted request per run per this many seconds (and one pending)
MAX_CONTROL_BODY_BYTES = 4096    # {node, run, action} is ~60 bytes
MAX_ID_CHARS = 64                # node and run ids (ComfyUI node ids look like "12" or "7:3")
MAX_KEPT_RUNS = 16               # runs whose state GET /dreambooth/state still returns (the latest of each node too)

_ACTION_MESSAGES = {
    "save_now": "Save requested: a checkpoint is written at the next step.",
    "stop_after_epoch": "Stop requested: training stops at the end of this epoch and saves a resumable state.",
    "stop_now": "Stop requested: training stops at the next step and saves a resumable state.",
}


# --- message transport ---------------------------------------------------------------------------------------
def _send_ui_message(event: str, data: dict) -> None:
    """Send one message to every browser tab; never lets a UI problem break a training run."""
    try:
        comfy_compat.send_ui_message(event, data)
    except Exception:  # noqa: BLE001 - a dead websocket must not kill hours of training
        log.debug("could not send %s to the browser", event, exc_info=True)


# --- JSON hygiene --------------------------------------------------------------------------------------------
def _json_number(value):
    """Finite numbers as float, NaN/inf as a short string ("nan", "inf"), missing as None.

    The browser's JSON.parse rejects NaN/Infinity, and a NaN loss is exactly what the user must see.
    """
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else str(number)


def _json_int(value):
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


# --- loss history --------------------------------------------------------------------------------------------
class LossHistory:
    """[step, loss] points, kept under `max_points` by merging neighbours (mean loss, later step).

    After each merge the bucket size (`stride`) doubles, so old and new points keep the same density.
    """

    def __init__(self, max_points: int = MAX_HISTORY_POINTS) -> None:
        # even, so a full list merges into exact pairs and every point covers the same number of steps
        self.max_points = max(2, int(max_points) + int(max_points) % 2)
        self.stride = 1
        self._points: list[list[float]] = []
        self._bucket: list[tuple[int, float]] = []

    @staticmethod
    def _merge(points) -> list:
        return [points[-1][0], sum(p[1] for p in points) / len(points)]

    def add(self, step: int, loss: float) -> None:
        self._bucket.append((step, loss))
        if len(self._bucket) >= self.stride:
            self._points.append(self._merge(self._bucket))
            self._bucket = []
            if len(self._points) >= self.max_points:
                self._points = [self._merge(self._points[i:i + 2]) for i in range(0, len(self._points), 2)]
                self.stride *= 2

    def points(self) -> list[list[float]]:
        tail = [self._merge(self._bucket)] if self._bucket else []
        return [list(p) for p in self._points] + tail

    def __len__(self) -> int:
        return len(self._points) + (1 if self._bucket else 0)


# --- state store ---------------------------------------------------------------------------------------------
# The latest reporter of each node, and the latest MAX_KEPT_RUNS runs of any node (by run id, oldest first): the same
# node id in another workflow must not hide this workflow's run. States are built when asked for (a page load), not
# on every training step: copying a long loss history per step would cost the trainer milliseconds each time.
_reporters: dict[str, "LiveReporter"] = {}
_runs: dict[str, "LiveReporter"] = {}
_reporters_lock = threading.Lock()


def _register(reporter: "LiveReporter") -> None:
    with _reporters_lock:
        _reporters[reporter.node] = reporter
        _runs.pop(reporter.run, None)
        _runs[reporter.run] = reporter
        latest = {id(r) for r in _reporters.values()}
        for run in [run for run, r in _runs.items() if id(r) not in latest][:max(0, len(_runs) - MAX_KEPT_RUNS)]:
            del _runs[run]


def get_runs() -> list[dict]:
    """The states of the runs kept (oldest first): what a reloaded page matches against its workflow's prompts."""
    with _reporters_lock:
        reporters = list(_runs.values())
    return [reporter.snapshot() for reporter in reporters]


def get_state(node=None) -> dict | None:
    """A copy of the latest state of `node`'s run (None if unknown), or {node id: state} for all nodes."""
    with _reporters_lock:
        if node is None:
            reporters = dict(_reporters)
        else:
            reporter = _reporters.get(str(node))
    if node is None:
        return {key: reporter.snapshot() for key, reporter in reporters.items()}
    return reporter.snapshot() if reporter is not None else None


def clear_states() -> None:
    """Forget every stored state (tests; a fresh server starts empty anyway)."""
    with _reporters_lock:
        _reporters.clear()
        _runs.clear()


class LiveReporter:
    """Reports one training run of one node to the browser and to the state store.

    All numbers may be None when unknown (e.g. ETA before the first steps); the panel shows "-" for them.
    Its methods are called from the training thread; snapshot() from the server's thread.
    """

    def __init__(self, node_id, run_dir: str = "", *, min_interval_s: float = MIN_PROGRESS_INTERVAL_S,
                 max_history_points: int = MAX_HISTORY_POINTS, clock: Callable[[], float] = time.monotonic,
                 send: Callable[[str, dict], None] | None = None, run_id: str | None = None,
                 save_interval_s: float = SAVE_REQUEST_MIN_INTERVAL_S, prompt_id: str | None = None) -> None:
        self.node = str(node_id)
        # the ComfyUI prompt that started the run: panels show a run only in the workflow that queued that prompt
        self.prompt = str(prompt_id)[:MAX_ID_CHARS] if prompt_id else None
        # a new id per reporter: the panel starts a fresh chart when it changes (also for a resumed run)
        self.run = str(run_id) if run_id else uuid.uuid4().hex[:12]
        self.min_interval_s = float(min_interval_s)
        self._clock = clock
        self._send = send or _send_ui_message
        self._lock = threading.Lock()
        self._history = LossHistory(max_history_points)
        self._unsent_points: list[list[float]] = []
        self._progress_unsent = False
        self._last_progress_sent: float | None = None
        self.save_interval_s = float(save_interval_s)
        self.control = new_control(self.node)   # fresh: requests aimed at an earlier run must not stop this one
        # what the trainer polls: a Save-now request it takes is shown ("saving ...", then "saved step N")
        self.trainer_control = _TrainerControl(self.control, self._saving)
        self._save_pending: int | None = None   # the step of a requested checkpoint being written
        self._run_dir = str(run_dir or "")
        self._state = {
            "node": self.node, "run": self.run, "prompt": self.prompt, "run_dir": public_path(self._run_dir),
            "state": "starting", "message": "",
            "step": 0, "total": None, "epoch": None, "epochs": None, "stage": None,
            "loss": None, "lr": None, "it_per_s": None, "eta_s": None,
            "previews": [], "preview_step": None,
            "updated": time.time(),
        }
        _register(self)
        self._send(STATUS_EVENT, self._status_payload())

    # --- public API used by the node / trainer -----------------------------------------------------------
    @property
    def run_dir(self) -> str:
        """The run folder as the node knows it (absolute); the state shows it through public_path()."""
        return self._run_dir

    @run_dir.setter
    def run_dir(self, value) -> None:
        self._run_dir = str(value or "")
        shown = public_path(self._run_dir)
        with self._lock:
            self._state["run_dir"] = shown

    def progress(self, step, total=None, epoch=None, loss=None, lr=None, it_per_s=None, eta_s=None, *,
                 epochs=None, stage=None) -> None:
        """One training step finished. Sends at most one message per `min_interval_s`, always the last step.
        `epochs`: how many the run has; `stage`: the Imagic stage ("embedding" / "unet"), None for other runs."""
        self._confirm_save()
        step = _json_int(step) or 0
        loss_value = _json_number(loss)
        with self._lock:
            if isinstance(loss_value, float):
                self._history.add(step, loss_value)
                self._unsent_points.append([step, loss_value])
            self._state.update({
                "step": step, "total": _json_int(total), "epoch": _json_int(epoch), "loss": loss_value,
                "lr": _json_number(lr), "it_per_s": _json_number(it_per_s), "eta_s": _json_number(eta_s),
                "epochs": _json_int(epochs), "stage": str(stage)[:40] if stage else None, "updated": time.time(),
            })
            started = self._state["state"] == "starting"
            if started:   # the first step: the preparation message ("caching latents: 8/8") is over
                self._state.update({"state": "running", "message": "training"})
            self._progress_unsent = True
        total_steps = self._state["total"]
        last_step = total_steps is not None and step >= total_steps
        now = self._clock()
        if started or last_step or self._last_progress_sent is None \
                or now - self._last_progress_sent >= self.min_interval_s:
            self.flush()
        if started:       # the panel's status line shows the last status message
            self._send(STATUS_EVENT, self._status_payload())

    def resumed(self, points) -> None:
        """The run continues an earlier one: its [step, loss] points so far (the run's loss log up to the checkpoint)
        start the chart at step 1, not at the resumed step. Sent with the next progress message."""
        with self._lock:
            for step, loss in points:
                value, step = _json_number(loss), _json_int(step)
                if isinstance(value, float) and step is not None:
                    self._history.add(step, value)
            self._unsent_points = self._history.points() + self._unsent_points

    def preview(self, images: list[dict], step=None) -> None:
        """New preview images, as ComfyUI image refs {filename, subfolder, type} (what /view serves)."""
        self._confirm_save()
        refs = [_image_ref(image) for image in images or []]
        refs = [ref for ref in refs if ref is not None][-MAX_PREVIEWS:]
        with self._lock:
            preview_step = _json_int(step) if step is not None else self._state["step"]
            self._state.update({"previews": refs, "preview_step": preview_step, "updated": time.time()})
        self._send(PREVIEW_EVENT, {"node": self.node, "run": self.run, "prompt": self.prompt, "step": preview_step,
                                   "images": [dict(ref) for ref in refs]})

    def status(self, state: str, message: str = "") -> None:
        """Run state change ("running", "saving", "done", "error", ... see STATES) with a human message."""
        if state not in STATES:
            raise ValueError(f"unknown live state {state!r}; expected one of {', '.join(STATES)}")
        self.flush()   # the chart must show every step before the final state
        message = public_text(message)   # every tab sees it: no absolute paths (error texts name files)
        with self._lock:
            if state != "saving":
                self._save_pending = None     # a save that failed ends as "error"; one at a stop says so itself
            self._state.update({"state": state, "message": message, "updated": time.time()})
            if state in TERMINAL_STATES and state != "done":   # nothing remains to be estimated
                self._state["eta_s"] = None
        if state in TERMINAL_STATES:
            release_control(self.node)   # a finished run takes no more requests; the route answers 404
        self._send(STATUS_EVENT, self._status_payload())

    def stage(self, message: str) -> None:
        """What the run is preparing (scanning, class images, caching, with counts): the status message until
        the first training step; ignored after it (but it tells that a requested checkpoint is written)."""
        self._confirm_save()
        with self._lock:
            starting = self._state["state"] == "starting"
        if starting:
            self.status("starting", message)

    def flush(self) -> None:
        """Send the pending progress now (if any)."""
        with self._lock:
            if not self._progress_unsent:
                return
            payload = {key: self._state[key] for key in
                       ("node", "run", "prompt", "state", "step", "total", "epoch", "epochs", "stage", "loss", "lr",
                        "it_per_s", "eta_s")}
            payload["points"] = self._unsent_points
            self._unsent_points = []
            self._progress_unsent = False
            self._last_progress_sent = self._clock()
        self._send(PROGRESS_EVENT, payload)

    def snapshot(self) -> dict:
        """The full current state: what GET /dreambooth/state returns for this node (a fresh copy)."""
        with self._lock:
            state = dict(self._state)
            state["previews"] = [dict(ref) for ref in self._state["previews"]]
            state["loss_history"] = self._history.points()
            state["history_stride"] = self._history.stride
        control = find_control(self.node) if _reporters.get(self.node) is self else None
        state["control"] = control.snapshot() if control is not None else None
        return state

    def current_state(self) -> str:
        """The run's state name ("running", "done", ...), without copying the whole snapshot."""
        with self._lock:
            return self._state["state"]

    @property
    def state(self) -> dict:
        """Same as snapshot()."""
        return self.snapshot()

    # --- internals ---------------------------------------------------------------------------------------
    def _saving(self) -> None:
        """The trainer took a Save-now request: it writes the checkpoint of the step it just reported, now."""
        with self._lock:
            step = self._save_pending = self._state["step"]
        self.status("saving", f"saving a checkpoint at step {step}…")

    def _confirm_save(self) -> None:
        """The trainer's next word after taking a save request comes once the checkpoint is written (it saves before
        anything else; a failed save raises instead): the panel's notice is replaced by "saved step N"."""
        with self._lock:
            step = self._save_pending
        if step is not None:
            self.status("running", f"saved step {step}")

    def _status_payload(self) -> dict:
        control = find_control(self.node)
        with self._lock:
            return {"node": self.node, "run": self.run, "prompt": self.prompt, "state": self._state["state"],
                    "message": self._state["message"], "control": control.snapshot() if control else None}


class _TrainerControl:
    """A run's TrainingControl as the trainer sees it (TrainCallbacks.control): the same flags, but taking a Save-now
    request also tells the reporter, which then confirms the checkpoint on the panel."""

    def __init__(self, control, on_save: Callable[[], None]) -> None:
        self._control = control
        self._on_save = on_save

    def take_save_request(self) -> bool:
        taken = self._control.take_save_request()
        if taken:
            try:
                self._on_save()
            except Exception:  # noqa: BLE001 - reporting never breaks a run
                log.debug("could not report the requested save", exc_info=True)
        return taken

    def __getattr__(self, name):
        return getattr(self._control, name)


def _image_ref(image) -> dict | None:
    """A clean {filename, subfolder, type}; None for anything /view could not serve (a subfolder that is absolute
    or climbs out of its folder would only tell the browser where files live)."""
    if not isinstance(image, dict) or not image.get("filename"):
        return None
    filename, subfolder = str(image["filename"]), str(image.get("subfolder") or "").replace("\\", "/")
    if "/" in filename.replace("\\", "/") or os.path.isabs(subfolder) or ABSOLUTE_PATH.match(subfolder) \
            or ".." in subfolder.split("/"):
        return None
    return {"filename": filename, "subfolder": subfolder, "type": str(image.get("type") or "output")}


# --- routes --------------------------------------------------------------------------------------------------
def _short(value) -> str:
    """A caller-supplied value for an error message: repr()ed and cut, so a huge id cannot make a huge answer."""
    text = repr(value)
    return text if len(text) <= MAX_ID_CHARS + 2 else text[:MAX_ID_CHARS] + "…"


def state_response(node=None) -> tuple[int, dict]:
    """(HTTP status, JSON body) for GET /dreambooth/state[?node=ID]: without a node, {"nodes": the latest run of
    each node, "runs": the runs kept, oldest first}."""
    if node in (None, ""):
        return 200, {"nodes": get_state(), "runs": get_runs()}
    state = get_state(node) if len(str(node)) <= MAX_ID_CHARS else None
    if state is None:
        return 404, {"error": f"no DreamBooth training state for node {_short(node)}: "
                              "it has not trained since the server started"}
    return 200, state


def _id_field(payload: dict, key: str, what: str) -> tuple[str | None, str | None]:
    """(value as str, None) or (None, the 400 error) for the id `key` of a control request."""
    value = payload.get(key)
    if value is None or value == "":
        return None, f"missing {key!r}: {what}"
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None, f"{key!r} must be a string, not {type(value).__name__}"
    value = str(value)
    if len(value) > MAX_ID_CHARS:
        return None, f"{key!r} is longer than {MAX_ID_CHARS} characters"
    return value, None


def control_response(payload, now: float | None = None) -> tuple[int, dict]:
    """(HTTP status, JSON body) for POST /dreambooth/control {node, run, action}.

    400: not an object like that; 404: no run on that node, or the run has ended; 409: `run` is not the node's
    current run (a stale tab: its buttons must not act on the run that replaced it); 429: Save now while a request
    is pending or within SAVE_REQUEST_MIN_INTERVAL_S of the last one (body: retry_after_s).
    `now`: the reporter's clock (tests); its own clock by default.
    """
    if not isinstance(payload, dict):
        return 400, {"error": 'the body must be a JSON object like {"node": "5", "run": "<run id>", '
                              '"action": "save_now"}'}
    node, error = _id_field(payload, "node", "the id of the TrainDreamBooth node to control")
    if error is None:
        run, error = _id_field(payload, "run", "the id of the run the panel shows (GET /dreambooth/state)")
    if error is not None:
        return 400, {"error": error}
    action = payload.get("action")
    if not isinstance(action, str) or action not in ACTIONS:
        return 400, {"error": f"unknown action {_short(action)}; expected one of {', '.join(ACTIONS)}"}
    with _reporters_lock:
        reporter = _reporters.get(node)
    if reporter is None:
        return 404, {"error": f"no training run is active for node {node!r}; queue the workflow first"}
    if run != reporter.run:
        return 409, {"error": f"stale run id {run!r}: node {node!r} is training another run now; reload its state "
                              "(GET /dreambooth/state) and try again"}
    control = find_control(node)
    if control is None or control is not reporter.control:
        return 404, {"error": f"run {run!r} of node {node!r} has ended; queue the workflow to train again"}
    if action == "save_now":
        refused = control.request_save_limited(reporter.save_interval_s,
                                               reporter._clock() if now is None else now)
        if refused is not None:
            reason, wait_s = refused
            if reason == "pending":
                error = "a save is already requested: the checkpoint is written at the next step"
            else:
                error = (f"a checkpoint was requested {reporter.save_interval_s - wait_s:.0f} s ago; "
                         f"Save now is allowed once every {reporter.save_interval_s:.0f} s (try again in "
                         f"{math.ceil(wait_s)} s)")
            return 429, {"error": error, "retry_after_s": math.ceil(wait_s) if wait_s > 0 else 1,
                         "control": control.snapshot()}
        changed = True
    else:
        before = control.snapshot()
        control.apply(action)
        changed = control.snapshot() != before   # a repeated stop changes nothing and tells nobody again
    message = _ACTION_MESSAGES[action]
    if changed:   # tell every open tab, not only the one that clicked
        _send_ui_message(STATUS_EVENT, {"node": node, "run": reporter.run, "prompt": reporter.prompt,
                                        "state": reporter.current_state(),
                                        "message": message, "control": control.snapshot()})
    return 200, {"ok": True, "node": node, "run": reporter.run, "action": action, "message": message,
                 "control": control.snapshot()}


class BadBody(Exception):
    """A request body we refuse: `status` and a one-line `message`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def read_json_body(request, limit: int = MAX_CONTROL_BODY_BYTES):
    """The JSON value of an aiohttp request's body, read no further than `limit` bytes. Raises BadBody:
    415 not sent as application/json (which also means a cross-site form cannot send it without the browser
    asking the server first), 413 over `limit`, 400 empty or not JSON."""
    content_type = getattr(request, "content_type", "") or ""
    if content_type.lower() != "application/json":
        raise BadBody(415, f"send the body as JSON with 'Content-Type: application/json', not "
                           f"{_short(content_type) if content_type else 'no content type'}")
    length = getattr(request, "content_length", None)
    if length is not None and length > limit:
        raise BadBody(413, f"the body is {length} bytes; at most {limit} are accepted")
    chunks, size = [], 0
    while True:   # a chunked body has no length: read it no further than the limit
        chunk = await request.content.read(limit + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise BadBody(413, f"the body is over {limit} bytes; at most {limit} are accepted")
    if not size:
        raise BadBody(400, 'empty body: send a JSON object like {"node": "5", "run": "<run id>", '
                           '"action": "save_now"}')
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as e:   # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise BadBody(400, f"the body is not valid JSON ({str(e).splitlines()[0][:120]})") from None


_routes_registered = False


def _add_routes(routes) -> None:
    """Add our handlers to an aiohttp RouteTableDef (ComfyUI's PromptServer.instance.routes)."""
    from aiohttp import web   # ComfyUI's server dependency; only needed inside ComfyUI

    def answer(status: int, body: dict):
        headers = {"Retry-After": str(body["retry_after_s"])} if status == 429 and "retry_after_s" in body else None
        return web.json_response(body, status=status, headers=headers)

    @routes.get("/dreambooth/state")
    async def dreambooth_state(request):
        try:
            return answer(*state_response(request.rel_url.query.get("node")))
        except Exception:  # noqa: BLE001 - a bug here must not show a traceback to whoever asks
            log.exception("GET /dreambooth/state failed")
            return answer(500, {"error": "internal error in the DreamBooth state route; see the server log"})

    @routes.post("/dreambooth/control")
    async def dreambooth_control(request):
        try:
            payload = await read_json_body(request)
        except BadBody as e:
            return answer(e.status, {"error": str(e)})
        except Exception as e:  # noqa: BLE001 - a broken connection or stream is the client's problem
            return answer(400, {"error": f"could not read the body: {type(e).__name__}"})
        try:
            return answer(*control_response(payload))
        except Exception:  # noqa: BLE001
            log.exception("POST /dreambooth/control failed")
            return answer(500, {"error": "internal error in the DreamBooth control route; see the server log"})


def register_routes() -> bool:
    """Add GET /dreambooth/state and POST /dreambooth/control to ComfyUI's server (also served under /api).

    Call at pack import time (ComfyUI copies its route table after loading custom nodes). Returns False and
    does nothing outside ComfyUI; idempotent inside.
    """
    global _routes_registered
    if not _routes_registered:
        _routes_registered = comfy_compat.register_routes(_add_routes)
    return _routes_registered
