"""Quiet library calls: a run prints the pack's own lines, not the libraries' notices and progress bars.

diffusers / transformers print import-time notices (transformers 5: "`CLIPImageProcessor` requires torchvision
(not installed); falling back ..." when a diffusers pipeline module is imported), FutureWarnings about their own
API changes, and tqdm bars while loading weights ("Loading weights: 100%|██████████| 36/36"). None of it is
something a DreamBooth user can act on, and it buries the lines that matter (broken images, stages, results).

`quiet_libraries()` silences exactly that for the duration of the pack's own calls — library log levels at
ERROR, their progress bars off, FutureWarning / DeprecationWarning ignored — and restores everything when the
outermost call ends, so the user's other ComfyUI nodes see the libraries as they were. Every node function runs
inside it (nodes/__init__.py), and so does every CLI command. Verbose mode turns it into a no-op: the CLI's
`--debug`, or COMFYUI_DREAMBOOTH_DEBUG=1 in the environment (e.g. for ComfyUI).

Scope and threads: log levels, progress-bar switches and warning filters are process-wide settings of those
libraries, so "scoped" means in time: from the outermost entry to its exit (nested entries change nothing).
ComfyUI executes one node at a time, so no other node runs in between. Cheap to import: no torch, diffusers or
transformers at module level.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading
import warnings

_verbose = os.environ.get("COMFYUI_DREAMBOOTH_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
_lock = threading.Lock()
_depth = 0
_restore: list = []          # undo steps of the outermost entry, run in reverse order on its exit
_LIBRARY_LOGGERS = ("transformers.utils.logging", "diffusers.utils.logging")
_WARNING_CATEGORIES = (FutureWarning, DeprecationWarning)


def set_verbose(verbose: bool) -> None:
    """Verbose: library output is left alone (the CLI's --debug)."""
    global _verbose
    _verbose = bool(verbose)


def is_verbose() -> bool:
    return _verbose


def _silence(undo: list) -> None:
    catcher = warnings.catch_warnings()
    catcher.__enter__()
    undo.append(lambda: catcher.__exit__(None, None, None))
    for category in _WARNING_CATEGORIES:
        warnings.filterwarnings("ignore", category=category)
    for name in _LIBRARY_LOGGERS:
        try:
            lib = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a library that is missing or broken has nothing to silence
            continue
        level = lib.get_verbosity()
        lib.set_verbosity(max(level, lib.ERROR))
        undo.append(functools.partial(lib.set_verbosity, level))
        if lib.is_progress_bar_enabled():
            lib.disable_progress_bar()
            undo.append(lib.enable_progress_bar)


def _run(undo: list) -> None:
    for step in reversed(undo):
        with contextlib.suppress(Exception):
            step()


@contextlib.contextmanager
def quiet_libraries():
    """Silence library notices, FutureWarnings and progress bars for the block (see the module docstring)."""
    global _depth, _restore
    if _verbose:
        yield
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            _restore = []
            try:
                _silence(_restore)
            except BaseException:
                _depth -= 1
                _run(_restore)
                raise
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                undo, _restore = _restore, []
                _run(undo)


def run_quietly(function):
    """Decorator: `function` runs inside `quiet_libraries()`; marked with `quiet_libraries = True`."""
    if getattr(function, "quiet_libraries", False):
        return function

    @functools.wraps(function)
    def quiet_function(*args, **kwargs):
        with quiet_libraries():
            return function(*args, **kwargs)

    quiet_function.quiet_libraries = True
    return quiet_function


__all__ = ["quiet_libraries", "run_quietly", "set_verbose", "is_verbose"]
