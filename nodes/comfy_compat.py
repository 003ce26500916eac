"""The one place that touches ComfyUI's own modules (folder_paths, comfy.*, server).

Every helper works in two worlds:
  * inside ComfyUI (its modules are already loaded, because ComfyUI imports them before any custom node), it calls
    the real thing: folder_paths for directories and model lists, comfy.utils.ProgressBar, the interrupt flag of
    comfy.model_management, PromptServer messages;
  * headless (plain Python, tests, our `comfyui-dreambooth run`), it falls back to module-level settings that the
    runner sets: an output directory, a terminal progress bar on stderr, an interrupt flag set by Ctrl-C.

We never *import* ComfyUI to find out whether we are inside it: a stray module called `comfy` on sys.path must not
switch the pack into ComfyUI mode. ComfyUI is "present" only when its modules are already loaded.
Cheap to import: no torch here (torch is imported inside the two functions that need it).
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Any, Callable, Iterable, TextIO

from .terminal_progress import TerminalProgress

# ComfyUI's model-file extensions (folder_paths.supported_pt_extensions).
MODEL_EXTENSIONS = (".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft")
# Model folders the pack reads and writes; headless they live under the output directory.
MODEL_KINDS = ("checkpoints", "loras", "diffusers", "vae", "embeddings")

_settings_lock = threading.Lock()
_headless_output_dir: str | None = None     # None = ./output, resolved against the current directory at call time
_headless_input_dir: str | None = None      # None = ./input
_ui_listeners: list[Callable[[str, dict], None]] = []


# ------------------------------------------------------------------------------------------------------------------
# Are we inside ComfyUI?
# ------------------------------------------------------------------------------------------------------------------
def in_comfyui() -> bool:
    """True when ComfyUI's own modules are loaded (i.e. this pack was loaded by ComfyUI)."""
    return "folder_paths" in sys.modules and "comfy" in sys.modules


def _comfy(module_name: str):
    """ComfyUI's module `module_name` when it is loaded, else None (headless, or a ComfyUI without it).

    Only already-loaded modules are used: ComfyUI imports folder_paths, comfy.utils, comfy.model_management and
    server before it loads custom nodes, and importing e.g. `server` ourselves would start ComfyUI's machinery.
    """
    if not in_comfyui():
        return None
    return sys.modules.get(module_name)


# ------------------------------------------------------------------------------------------------------------------
# Directories and model files
# ------------------------------------------------------------------------------------------------------------------
def set_output_directory(path: str | os.PathLike | None) -> None:
    """Headless output folder (ComfyUI's output folder is used instead when inside ComfyUI). None = ./output."""
    global _headless_output_dir
    with _settings_lock:
        _headless_output_dir = None if path is None else os.path.abspath(os.fspath(path))


@contextlib.contextmanager
def using_output_directory(path: str | os.PathLike | None):
    """Headless output folder for the duration of a `with` block (the runner's --output-dir), then the previous one."""
    previous = _headless_output_dir
    set_output_directory(path)
    try:
        yield
    finally:
        set_output_directory(previous)


def set_input_directory(path: str | os.PathLike | None) -> None:
    """Headless input folder. None = ./input."""
    global _headless_input_dir
    with _settings_lock:
        _headless_input_dir = None if path is None else os.path.abspath(os.fspath(path))


def output_directory() -> str:
    folder_paths = _comfy("folder_paths")
    if folder_paths is not None:
        return folder_paths.get_output_directory()
    return _headless_output_dir or os.path.abspath("output")


def input_directory() -> str:
    folder_paths = _comfy("folder_paths")
    if folder_paths is not None:
        return folder_paths.get_input_directory()
    return _headless_input_dir or os.path.abspath("input")


def public_folders() -> list[tuple[str, str]]:
    """(absolute folder, the name a browser may see for it): ComfyUI's output, input and temp folders, models/ and
    every configured folder of the model kinds the pack uses ("models/loras"); headless the output and input
    folders. Whatever ComfyUI lacks (or fails to answer) is left out: callers hide paths outside these folders."""
    found: list[tuple[str, str]] = []

    def add(getter, label):
        try:
            path = getter()
        except Exception:     # noqa: BLE001 - a ComfyUI without that folder, or a half-faked one in tests
            return
        if isinstance(path, str) and path:
            found.append((os.path.abspath(path), label))

    add(output_directory, "output")
    add(input_directory, "input")
    folder_paths = _comfy("folder_paths")
    if folder_paths is not None:
        add(lambda: folder_paths.get_temp_directory(), "temp")
        add(lambda: folder_paths.models_dir, "models")
        for kind in MODEL_KINDS:
            try:
                paths = list(folder_paths.get_folder_paths(kind))
            except Exception:  # noqa: BLE001
                continue
            for path in paths:
                add(lambda path=path: path, f"models/{kind}")
    return found


def _check_kind(kind: str) -> None:
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model folder kind {kind!r}; expected one of {', '.join(MODEL_KINDS)}")


def _model_roots(kind: str) -> list[str]:
    """Every folder of that kind, first = where new files go."""
    _check_kind(kind)
    folder_paths = _comfy("folder_paths")
    if folder_paths is not None:
        return list(folder_paths.get_folder_paths(kind))
    return [os.path.join(output_directory(), kind)]


def models_folder(kind: str) -> str:
    """Where models of `kind` go: ComfyUI's models/<kind> (first configured path) or, headless, <output>/<kind>."""
    return _model_roots(kind)[0]


def _files_under(root: str, extensions: Iterable[str]) -> list[str]:
    from ..training.fsutil import walk     # stdlib only: keeps this module cheap

    found = []
    if not os.path.isdir(root):
        return found
    # symlinked folders are followed, each real folder once: a link loop (`a/up -> ..`) hung the model list
    for folder, subdirs, files in walk(root, follow_links=True):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        for name in files:
            if name.lower().endswith(tuple(extensions)):
                found.append(os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/"))
    return found


def list_models(kind: str) -> list[str]:
    """Model file names of `kind`, relative to their folder with "/" separators (what ComfyUI's combos show)."""
    _check_kind(kind)
    if kind == "diffusers":
        return list_diffusers_folders()
    folder_paths = _comfy("folder_paths")
    if folder_paths is not None:
        return list(folder_paths.get_filename_list(kind))
    return sorted(_files_under(models_folder(kind), MODEL_EXTENSIONS))


def list_diffusers_folders() -> list[str]:
    """Folders under models/diffusers (any depth) that hold a diffusers pipeline (model_index.json)."""
    names = set()
    for root in _model_roots("diffusers"):
        for index_file in _files_under(root, ("model_index.json",)):
            if os.path.basename(index_file) == "model_index.json":
                names.add(os.path.dirname(index_file))
    names.discard("")      # a model_index.json directly in models/diffusers is not a named model
    return sorted(names)


def _inside(root: str, name: str) -> str | None:
    """root/name, or None when `name` climbs out of root (ComfyUI refuses those as well)."""
    normalised = os.path.normpath(name.replace("/", os.sep))
    if os.path.isabs(normalised) or normalised == ".." or normalised.startswith(".." + os.sep):
        return None
    return os.path.join(root, normalised)


def full_model_path(kind: str, name: str) -> str:
    """Absolute path of model `name` (as listed by list_models) of `kind`; FileNotFoundError naming where we looked."""
    roots = _model_roots(kind)
    if kind != "diffusers":
        folder_paths = _comfy("folder_paths")
        if folder_paths is not None:
            path = folder_paths.get_full_path(kind, name)
            if path:
                return path
    for root in roots:
        path = _inside(root, name)
        if path is None:
            raise ValueError(f"model name {name!r} must stay inside the {kind} folder ({root})")
        exists = os.path.isdir(path) if kind == "diffusers" else os.path.isfile(path)
        if exists:
            return os.path.abspath(path)
    what = "diffusers folder" if kind == "diffusers" else f"{kind} file"
    raise FileNotFoundError(f"{what} {name!r} not found in {', '.join(roots)}")


def server_listen() -> str | None:
    """ComfyUI's --listen value (comma-separated addresses; default 127.0.0.1); None headless or when unknown."""
    cli_args = _comfy("comfy.cli_args")
    args = getattr(cli_args, "args", None) if cli_args is not None else None
    listen = getattr(args, "listen", None)
    return str(listen) if listen is not None else None


def data_roots() -> list[str]:
    """The folders ComfyUI itself reads and writes (public_folders): output, input, temp, models/ and every
    configured folder of the model kinds the pack uses. The pack's file-access check allows paths inside them."""
    return [path for path, _label in public_folders()]


# ------------------------------------------------------------------------------------------------------------------
# Interrupt
# ------------------------------------------------------------------------------------------------------------------
class InterruptRequested(Exception):
    """Raised headless by check_interrupt() after Ctrl-C (inside ComfyUI its own InterruptProcessingException is)."""


_interrupt_flag = threading.Event()


def request_interrupt() -> None:
    """Ask running work to stop at its next check (the runner's first Ctrl-C; ComfyUI's interrupt when inside)."""
    model_management = _comfy("comfy.model_management")
    if model_management is not None:
        model_management.interrupt_current_processing(True)
    else:
        _interrupt_flag.set()


def clear_interrupt() -> None:
    model_management = _comfy("comfy.model_management")
    if model_management is not None:
        model_management.interrupt_current_processing(False)
    _interrupt_flag.clear()


def interrupt_requested() -> bool:
    """Poll without raising (e.g. to save a checkpoint before stopping)."""
    model_management = _comfy("comfy.model_management")
    if model_management is not None:
        return bool(model_management.processing_interrupted())
    return _interrupt_flag.is_set()


def check_interrupt() -> None:
    """Raise if the user asked to stop. Like ComfyUI, the flag is consumed by the raise."""
    model_management = _comfy("comfy.model_management")
    if model_management is not None:
        model_management.throw_exception_if_processing_interrupted()
        return
    if _interrupt_flag.is_set():
        _interrupt_flag.clear()
        raise InterruptRequested("interrupted by the user")


def interrupt_exception(message: str = "interrupted") -> BaseException:
    """A new interrupt exception of this world (ComfyUI's InterruptProcessingException inside it): work stopped on
    request with nothing to hand on ends its prompt the way Cancel does (no error dialog, nothing after it runs)."""
    model_management = _comfy("comfy.model_management")
    exc_type = getattr(model_management, "InterruptProcessingException", None) if model_management else None
    return (exc_type or InterruptRequested)(message)


def is_interrupt(exc: BaseException) -> bool:
    """True for the interrupt exception of either world (to save partial work, then re-raise)."""
    if isinstance(exc, InterruptRequested):
        return True
    model_management = _comfy("comfy.model_management")
    exc_type = getattr(model_management, "InterruptProcessingException", None) if model_management else None
    return exc_type is not None and isinstance(exc, exc_type)


# ------------------------------------------------------------------------------------------------------------------
# Progress
# ------------------------------------------------------------------------------------------------------------------
def log(message: str) -> None:
    """One line of the pack's own on the console (ComfyUI's terminal, or the CLI's output)."""
    print(f"[DreamBooth] {message}", flush=True)


class Progress:
    """Progress of one long job: ComfyUI's node progress bar inside ComfyUI, a terminal bar on stderr headless.

    Like ComfyUI's ProgressBar, every update is also an interruption point (raises after Ctrl-C / Cancel).
    Use as a context manager, or call close() when done, so the terminal line is finished.
    """

    def __init__(self, total: int, label: str = "", stream: TextIO | None = None):
        self.total = int(total)
        self.current = 0
        self._comfy_bar = None
        self._terminal = None
        comfy_utils = _comfy("comfy.utils")
        if comfy_utils is not None and hasattr(comfy_utils, "ProgressBar"):
            self._comfy_bar = comfy_utils.ProgressBar(self.total)
        else:
            self._terminal = TerminalProgress(self.total, label=label, stream=stream)

    def update_absolute(self, value: int, total: int | None = None, preview: Any = None) -> None:
        """`preview`: ComfyUI's ("JPEG", PIL.Image, max_size) tuple shown on the node; ignored headless."""
        if total is not None:
            self.total = int(total)
        self.current = min(int(value), self.total) if self.total else int(value)
        if self._comfy_bar is not None:
            self._comfy_bar.update_absolute(self.current, self.total, preview)
        else:
            self._terminal.update_absolute(self.current, self.total)
        check_interrupt()

    def update(self, n: int = 1, preview: Any = None) -> None:
        self.update_absolute(self.current + n, preview=preview)

    def close(self) -> None:
        if self._terminal is not None:
            self._terminal.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------------------------
# Messages to the browser, HTTP routes
# ------------------------------------------------------------------------------------------------------------------
def _prompt_server():
    server = _comfy("server")
    prompt_server = getattr(server, "PromptServer", None) if server is not None else None
    return getattr(prompt_server, "instance", None) if prompt_server is not None else None


def current_prompt_id() -> str | None:
    """The id of the prompt ComfyUI is executing now (the one POST /prompt answered to the tab that queued it);
    None headless or when this ComfyUI does not say."""
    utils = _comfy("comfy_execution.utils")
    try:
        context = utils.get_executing_context() if utils is not None else None
    except Exception:  # noqa: BLE001 - an older/newer ComfyUI: fall back to what the server remembers
        context = None
    prompt_id = getattr(context, "prompt_id", None) or getattr(_prompt_server(), "last_prompt_id", None)
    return str(prompt_id) if prompt_id else None


def add_ui_listener(fn: Callable[[str, dict], None]) -> Callable[[], None]:
    """Headless: also hand every send_ui_message to `fn(event, data)` (logging, tests). Returns a remover."""
    _ui_listeners.append(fn)
    return lambda: _ui_listeners.remove(fn) if fn in _ui_listeners else None


def send_ui_message(event: str, data: dict) -> None:
    """PromptServer.instance.send_sync(event, data) to every browser tab; headless only to add_ui_listener()s."""
    instance = _prompt_server()
    if instance is not None:
        instance.send_sync(event, data)
    for listener in list(_ui_listeners):
        listener(event, data)


def register_routes(fn: Callable[[Any], None]) -> bool:
    """Call `fn(PromptServer.instance.routes)` (an aiohttp RouteTableDef) inside ComfyUI; False headless.

    Call it at pack import time: ComfyUI adds the route table to its web app after loading custom nodes.
    """
    instance = _prompt_server()
    routes = getattr(instance, "routes", None) if instance is not None else None
    if routes is None:
        return False
    fn(routes)
    return True


# ------------------------------------------------------------------------------------------------------------------
# Memory and device
# ------------------------------------------------------------------------------------------------------------------
def free_comfy_memory() -> None:
    """Make ComfyUI drop the models it holds (before a training run needs the VRAM). No-op headless."""
    model_management = _comfy("comfy.model_management")
    if model_management is None:
        return
    model_management.unload_all_models()
    model_management.soft_empty_cache()


def release_training_memory() -> None:
    """After training: drop freed tensors and hand cached VRAM back (ComfyUI's soft_empty_cache when inside it)."""
    import gc

    gc.collect()
    model_management = _comfy("comfy.model_management")
    if model_management is not None:
        model_management.soft_empty_cache()
        return
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def comfy_torch_device():
    """ComfyUI's compute device (respects --cpu, --directml ...); headless cuda, then mps, then cpu."""
    model_management = _comfy("comfy.model_management")
    if model_management is not None:
        return model_management.get_torch_device()
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
