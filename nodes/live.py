"""Live training state for the web panel: progress/preview/status messages and the state store.

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
The HTTP side (GET /dreambooth/state, POST /dreambooth/control) is live_routes.py: it reads this store.

A ComfyUI server is often reachable by others, so the state and messages name files only relative to ComfyUI's
output/input/temp/model folders (anything else by its last component), never by an absolute path.

Outside ComfyUI the messages go nowhere, so the headless runner and the tests use the same code. Cheap to import:
no torch, no aiohttp.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
import uuid
from typing import Callable

from ..training.control import find_control, new_control, release_control
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
MAX_ID_CHARS = 64                # node and run ids (ComfyUI node ids look like "12" or "7:3")
MAX_KEPT_RUNS = 16               # runs whose state GET /dreambooth/state still returns (the latest of each node too)

# --- message transport ---------------------------------------------------------------------------------------
def send_ui_message(event: str, data: dict) -> None:
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


def find_reporter(node) -> "LiveReporter | None":
    """The reporter of `node`'s latest run (None if it has not trained since the server started)."""
    with _reporters_lock:
        return _reporters.get(str(node))


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
        self.clock = clock   # monotonic seconds: progress throttling, and the Save-now rate limit (live_routes)
        self._send = send or send_ui_message
        self._lock = threading.Lock()
        self._history = LossHistory(max_history_points)
        self._unsent_points: list[list[float]] = []
        self._validation: list[list[float]] = []          # [step, subject loss] of each validation (few)
        self._unsent_validation: list[list[float]] = []
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
        now = self.clock()
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

    def validation(self, step, loss) -> None:
        """A validation's subject loss (training/validation.py): the chart's second curve, sent with the next
        progress message."""
        value, step = _json_number(loss), _json_int(step)
        if not isinstance(value, float) or step is None:
            return
        with self._lock:
            self._validation.append([step, value])
            self._unsent_validation.append([step, value])
            self._progress_unsent = True

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
            if self._unsent_validation:       # only runs that validate send it (older panels ignore it)
                payload["val_points"] = self._unsent_validation
                self._unsent_validation = []
            self._progress_unsent = False
            self._last_progress_sent = self.clock()
        self._send(PROGRESS_EVENT, payload)

    def snapshot(self) -> dict:
        """The full current state: what GET /dreambooth/state returns for this node (a fresh copy)."""
        with self._lock:
            state = dict(self._state)
            state["previews"] = [dict(ref) for ref in self._state["previews"]]
            state["loss_history"] = self._history.points()
            state["history_stride"] = self._history.stride
            if self._validation:
                state["validation_history"] = [list(p) for p in self._validation]
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
