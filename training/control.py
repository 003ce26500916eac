"""How a run talks to its caller: requests from outside the training loop (the web panel's buttons, a CLI signal)
to the trainer (TrainingControl), the callbacks and result of train(), the exceptions a run ends early with, and
the step clock behind its progress (StepClock). trainer.py, loop.py and imagic.py share all of it.

The trainer runs in ComfyUI's executor thread; the requests arrive on the server's event-loop thread. So the
requests are plain flags behind a lock: the outside sets them, the trainer polls them at step boundaries and
acts where it is safe (saving between optimizer steps, stopping after an epoch with a resumable state).

Usage in the trainer:
    if control.take_save_request(): save_checkpoint(...)
    if control.should_stop(epoch_end=end_of_epoch): save_resumable_state(...); break

No ComfyUI imports here: the node layer owns the registry keys (node ids) and the route that sets the flags.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from .speed import StepTimer

ACTIONS = ("save_now", "stop_after_epoch", "stop_now")


class TrainingControl:
    """Thread-safe request flags for one training run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._save_requested = False
        self._stop_after_epoch = False
        self._stop_now = False
        self._last_save_request: float | None = None   # clock time of the last accepted request_save_limited()

    # --- requests (any thread) ---------------------------------------------------------------------------
    def request_save(self) -> None:
        """Ask for a checkpoint at the next step boundary (training goes on afterwards)."""
        with self._lock:
            self._save_requested = True

    def request_save_limited(self, min_interval_s: float, now: float | None = None) -> tuple[str, float] | None:
        """request_save() for callers that may be hostile or impatient (the web route): refused while an earlier
        request is still pending (the trainer has not taken it yet) or when the last accepted one is younger than
        `min_interval_s` seconds. None when accepted; else ("pending", 0.0) or ("too_soon", seconds to wait).
        `now`: the caller's clock (time.monotonic() by default), the same one on every call."""
        now = time.monotonic() if now is None else float(now)
        with self._lock:
            if self._save_requested:
                return "pending", 0.0
            if self._last_save_request is not None and now - self._last_save_request < min_interval_s:
                return "too_soon", min_interval_s - (now - self._last_save_request)
            self._save_requested = True
            self._last_save_request = now
            return None

    def request_stop(self, after_epoch: bool = True) -> None:
        """Ask the trainer to stop: at the end of the current epoch (default) or at the next step boundary."""
        with self._lock:
            if after_epoch:
                self._stop_after_epoch = True
            else:
                self._stop_now = True

    def stop_now(self) -> None:
        """Stop at the next step boundary."""
        self.request_stop(after_epoch=False)

    def apply(self, action: str) -> None:
        """Apply one of ACTIONS by name (what the web route receives)."""
        if action == "save_now":
            self.request_save()
        elif action == "stop_after_epoch":
            self.request_stop(after_epoch=True)
        elif action == "stop_now":
            self.stop_now()
        else:
            raise ValueError(f"unknown training control action {action!r}; expected one of {', '.join(ACTIONS)}")

    # --- polling (trainer thread) ------------------------------------------------------------------------
    def take_save_request(self) -> bool:
        """True once per request_save(): the flag is cleared so one click means one checkpoint."""
        with self._lock:
            requested, self._save_requested = self._save_requested, False
            return requested

    def should_stop(self, epoch_end: bool) -> bool:
        """True when the trainer must stop now. `epoch_end`: the step just finished closes an epoch."""
        with self._lock:
            return self._stop_now or (self._stop_after_epoch and epoch_end)

    @property
    def stop_requested(self) -> bool:
        """Any stop pending (lets the trainer report "stopping after this epoch")."""
        with self._lock:
            return self._stop_now or self._stop_after_epoch

    def snapshot(self) -> dict:
        """The pending requests as a JSON-ready dict (shown by the panel)."""
        with self._lock:
            return {"save_requested": self._save_requested,
                    "stop_after_epoch": self._stop_after_epoch,
                    "stop_now": self._stop_now}


# Registry keyed by run id / node id, shared by the node layer (creates one per run) and the web route.
controls: dict[str, TrainingControl] = {}
_registry_lock = threading.Lock()


def get_control(key) -> TrainingControl:
    """The control registered under `key` (str()-ed, so node id 5 and "5" agree), created if missing."""
    key = str(key)
    with _registry_lock:
        control = controls.get(key)
        if control is None:
            control = controls[key] = TrainingControl()
        return control


def new_control(key) -> TrainingControl:
    """A fresh control for a new run under `key`: requests left over from an earlier run must not stop it."""
    key = str(key)
    with _registry_lock:
        control = controls[key] = TrainingControl()
        return control


def find_control(key) -> TrainingControl | None:
    """The control under `key`, or None when no run registered one (the route answers 404 then)."""
    with _registry_lock:
        return controls.get(str(key))


def release_control(key) -> None:
    """Forget the control under `key` (after a run ends; later requests then find no run)."""
    with _registry_lock:
        controls.pop(str(key), None)


# ---- what a run gives back, and how it ends early (trainer.py and imagic.py alike) --------------------------
class TrainingInterrupted(Exception):
    """Stopped on request (Cancel, Ctrl-C, 'stop after epoch'); a resumable checkpoint was saved.
    `result`: the model as trained up to `step` (what the checkpoint holds), for a caller that goes on with it."""

    def __init__(self, message: str, run_dir: str = "", step: int = 0, checkpoint: str | None = None,
                 result: "TrainResult | None" = None):
        super().__init__(message)
        self.run_dir, self.step, self.checkpoint, self.result = run_dir, step, checkpoint, result


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; nothing was saved from the broken step on."""


class TrainingSaveError(RuntimeError):
    """A checkpoint could not be written (e.g. disk full); the previous checkpoint is intact."""


@dataclass
class TrainCallbacks:
    """Hooks for the node layer / CLI. All optional; none of them may raise except to stop training."""

    progress: Callable[[dict], None] | None = None       # {step, total, epoch, loss, lr, it_per_s, eta_s}
    preview: Callable[[list[str]], None] | None = None   # paths of new preview images
    log: Callable[[str], None] | None = None
    should_stop: Callable[[], bool] | None = None        # stop now (interrupt), with a resumable checkpoint
    control: TrainingControl | None = None               # save-now / stop-after-epoch from the web panel
    stage: Callable[[str, int, int], None] | None = None  # data preparation progress (stage, done, total)
    validation: Callable[[dict], None] | None = None     # a validation record (validation.py: step, loss, ...)


@dataclass
class TrainResult:
    model: object
    run_dir: str
    steps: int
    reused: bool = False
    final_loss: float | None = None
    report: str = ""
    info: dict = field(default_factory=dict)


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class StepClock:
    """Optimizer steps per second (from the mean of the latest step times, speed.StepTimer) and the time left:
    what the loss log and the progress callback show."""

    def __init__(self) -> None:
        self.started = time.time()
        self._timer = StepTimer(self.started)
        self.rate: float | None = None

    def tick(self) -> float:
        """One step done; returns the time now."""
        now = time.time()
        self.rate = self._timer.step(now)
        return now

    def since_start(self, now: float) -> float:
        return round(now - self.started, 4)

    def timing(self, steps_left: int) -> dict:
        """The progress callback's it_per_s, eta_s and eta (h:mm:ss)."""
        eta = steps_left / self.rate if self.rate else None
        return {"it_per_s": self.rate, "eta_s": eta, "eta": format_eta(eta) if self.rate else ""}


# ---- between two optimizer steps: what both step loops (loop.py, imagic.py) report and check ------------------
def log_step(run, clock: StepClock, progress, *, step: int, total: int, loss: float, lr: float, logged: dict,
             shown: dict, main: bool = True) -> None:
    """One step done: its line in the run's loss log (the main process writes it) and the progress callback.
    `logged` / `shown`: the loop's own fields (epoch, stage...) after "step" in the log line and after "total" in
    the progress."""
    now = clock.tick()
    if main:
        run.append_loss({"step": step, **logged, "loss": loss, "lr": lr, "time": clock.since_start(now)})
    if progress:
        progress({"step": step, "total": total, **shown, "loss": loss, "lr": lr, **clock.timing(total - step)})


def requested_save(control, save, say) -> str | None:
    """The web panel's Save now: the checkpoint `save()` writes for it at this step boundary, or None."""
    if control is None or not control.take_save_request():
        return None
    saved = save()
    say(f"saved {saved} (requested)")
    return saved


def stop_requested(cb: TrainCallbacks, epoch_end: bool) -> bool:
    """Stop now (Cancel, Ctrl-C), or the panel's stop: now, or at the end of this epoch (Imagic: this stage)."""
    control = cb.control
    return (cb.should_stop is not None and cb.should_stop()) or (
        control is not None and control.should_stop(epoch_end=epoch_end))
