"""nodes/comfy_compat.py: headless fallbacks, and delegation to (fake) ComfyUI modules when they are loaded."""
import io
import os
import subprocess
import sys
import types

import pytest

from comfyui_dreambooth.nodes import comfy_compat as cc
from comfyui_dreambooth.nodes import terminal_progress


@pytest.fixture(autouse=True)
def headless_defaults():
    cc.set_output_directory(None)
    cc.set_input_directory(None)
    cc.clear_interrupt()
    yield
    cc.set_output_directory(None)
    cc.set_input_directory(None)
    cc.clear_interrupt()


def touch(path, content=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


# --- headless ------------------------------------------------------------------------------------------------------
def test_headless_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not cc.in_comfyui()
    assert cc.output_directory() == str(tmp_path / "output")
    assert cc.input_directory() == str(tmp_path / "input")
    cc.set_output_directory(tmp_path / "out")
    cc.set_input_directory("in")
    assert cc.output_directory() == str(tmp_path / "out")
    assert cc.input_directory() == str(tmp_path / "in")
    assert cc.models_folder("checkpoints") == str(tmp_path / "out" / "checkpoints")
    assert cc.models_folder("loras") == str(tmp_path / "out" / "loras")
    with pytest.raises(ValueError, match="unknown model folder kind 'unet'"):
        cc.models_folder("unet")


def test_headless_model_lists_and_paths(tmp_path):
    cc.set_output_directory(tmp_path)
    touch(tmp_path / "checkpoints" / "b.safetensors")
    touch(tmp_path / "checkpoints" / "sub" / "a.ckpt")
    touch(tmp_path / "checkpoints" / "notes.txt")
    touch(tmp_path / "diffusers" / "my-model" / "model_index.json", b"{}")
    touch(tmp_path / "diffusers" / "org" / "other" / "model_index.json", b"{}")
    touch(tmp_path / "diffusers" / "not-a-model" / "unet" / "config.json", b"{}")
    assert cc.list_models("checkpoints") == ["b.safetensors", "sub/a.ckpt"]
    assert cc.list_models("loras") == []                     # missing folder: empty, no error
    assert cc.list_diffusers_folders() == ["my-model", "org/other"]
    assert cc.list_models("diffusers") == ["my-model", "org/other"]
    assert cc.full_model_path("checkpoints", "sub/a.ckpt") == str(tmp_path / "checkpoints" / "sub" / "a.ckpt")
    assert cc.full_model_path("diffusers", "org/other") == str(tmp_path / "diffusers" / "org" / "other")
    with pytest.raises(FileNotFoundError, match="checkpoints file 'nope.safetensors' not found in "):
        cc.full_model_path("checkpoints", "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="diffusers folder 'b.safetensors' not found"):
        cc.full_model_path("diffusers", "b.safetensors")
    with pytest.raises(ValueError, match="must stay inside the checkpoints folder"):
        cc.full_model_path("checkpoints", "../../etc/passwd")


def test_interrupt_flag_is_consumed_by_check():
    assert not cc.interrupt_requested()
    cc.check_interrupt()                       # nothing requested: no raise
    cc.request_interrupt()
    assert cc.interrupt_requested()
    with pytest.raises(cc.InterruptRequested) as info:
        cc.check_interrupt()
    assert cc.is_interrupt(info.value)
    assert not cc.is_interrupt(ValueError())
    assert not cc.interrupt_requested()
    cc.check_interrupt()


def test_terminal_progress_in_a_log_file_writes_few_lines():
    stream = io.StringIO()
    with cc.Progress(100, label="train", stream=stream) as progress:
        for _ in range(100):
            progress.update(1)
    lines = stream.getvalue().splitlines()
    assert 1 <= len(lines) <= 3                # first draw + final, not one line per step
    assert lines[-1].startswith("train |########################| 100/100")
    assert "in 0:00" in lines[-1] or "it/s" in lines[-1]


def test_terminal_progress_on_a_tty_redraws_in_place():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    bar = terminal_progress.TerminalProgress(4, label="sample", stream=stream)
    bar.update_absolute(1)
    bar.update_absolute(4)
    out = stream.getvalue()
    assert out.startswith("\r\033[K") and out.endswith("\n")
    assert "sample |" in out and "4/4" in out


def test_terminal_progress_render_shows_rate_and_eta(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(terminal_progress.time, "monotonic", lambda: clock[0])
    bar = terminal_progress.TerminalProgress(10, label="x", stream=io.StringIO(), width=10)
    clock[0] += 4.0
    bar.current = 2
    assert bar.render() == "x |##--------| 2/10 2.00 s/it ETA 0:16"


def test_progress_update_is_an_interruption_point():
    progress = cc.Progress(5, stream=io.StringIO())
    progress.update(1)
    cc.request_interrupt()
    with pytest.raises(cc.InterruptRequested):
        progress.update(1)
    progress.close()


def test_ui_messages_headless_go_to_listeners_only():
    seen = []
    remove = cc.add_ui_listener(lambda event, data: seen.append((event, data)))
    cc.send_ui_message("db.progress", {"step": 1})
    remove()
    cc.send_ui_message("db.progress", {"step": 2})
    assert seen == [("db.progress", {"step": 1})]
    assert cc.register_routes(lambda routes: None) is False


def test_memory_and_device_headless():
    cc.free_comfy_memory()          # no-op, must not raise
    device = cc.comfy_torch_device()
    assert device.type in ("cpu", "cuda", "mps")


# --- inside a (fake) ComfyUI -----------------------------------------------------------------------------------------
@pytest.fixture
def fake_comfy(tmp_path, monkeypatch):
    """Just enough of folder_paths / comfy.utils / comfy.model_management / server to see the delegation."""
    calls = []
    base = tmp_path / "ComfyUI"
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.get_output_directory = lambda: str(base / "output")
    folder_paths.get_input_directory = lambda: str(base / "input")
    folder_paths.get_folder_paths = lambda kind: [str(base / "models" / kind), str(tmp_path / "extra" / kind)]
    folder_paths.get_filename_list = lambda kind: ["from_comfy.safetensors"]

    def get_full_path(kind, name):
        path = base / "models" / kind / name
        return str(path) if path.is_file() else None
    folder_paths.get_full_path = get_full_path

    comfy = types.ModuleType("comfy")
    utils = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total):
            calls.append(("ProgressBar", total))

        def update_absolute(self, value, total=None, preview=None):
            calls.append(("update_absolute", value, total, preview))
    utils.ProgressBar = ProgressBar

    mm = types.ModuleType("comfy.model_management")

    class InterruptProcessingException(Exception):
        pass
    mm.InterruptProcessingException = InterruptProcessingException
    mm.flag = False
    mm.interrupt_current_processing = lambda value=True: setattr(mm, "flag", value)
    mm.processing_interrupted = lambda: mm.flag

    def throw():
        if mm.flag:
            mm.flag = False
            raise InterruptProcessingException()
    mm.throw_exception_if_processing_interrupted = throw
    mm.unload_all_models = lambda: calls.append("unload_all_models")
    mm.soft_empty_cache = lambda: calls.append("soft_empty_cache")
    mm.get_torch_device = lambda: "comfy-device"

    server = types.ModuleType("server")

    class Routes(list):
        pass

    class Instance:
        routes = Routes()

        def send_sync(self, event, data, sid=None):
            calls.append(("send_sync", event, data))
    server.PromptServer = type("PromptServer", (), {"instance": Instance()})
    comfy.utils, comfy.model_management = utils, mm
    for name, module in {"folder_paths": folder_paths, "comfy": comfy, "comfy.utils": utils,
                         "comfy.model_management": mm, "server": server}.items():
        monkeypatch.setitem(sys.modules, name, module)
    return types.SimpleNamespace(base=base, calls=calls, mm=mm, extra=tmp_path / "extra")


def test_inside_comfyui_everything_delegates(fake_comfy):
    base = fake_comfy.base
    assert cc.in_comfyui()
    cc.set_output_directory("/ignored/inside/comfyui")
    assert cc.output_directory() == str(base / "output")
    assert cc.input_directory() == str(base / "input")
    assert cc.models_folder("loras") == str(base / "models" / "loras")
    assert cc.list_models("checkpoints") == ["from_comfy.safetensors"]
    touch(base / "models" / "checkpoints" / "m.safetensors")
    assert cc.full_model_path("checkpoints", "m.safetensors") == str(base / "models" / "checkpoints" / "m.safetensors")
    # diffusers folders: every configured root is searched, names relative to their root
    touch(fake_comfy.extra / "diffusers" / "extra-model" / "model_index.json", b"{}")
    assert cc.list_diffusers_folders() == ["extra-model"]
    assert cc.full_model_path("diffusers", "extra-model") == str(fake_comfy.extra / "diffusers" / "extra-model")


def test_inside_comfyui_progress_interrupt_messages_memory(fake_comfy):
    calls, mm = fake_comfy.calls, fake_comfy.mm
    progress = cc.Progress(3)
    progress.update(2)
    progress.update_absolute(3, preview=("JPEG", None, 512))
    assert calls[:3] == [("ProgressBar", 3), ("update_absolute", 2, 3, None),
                         ("update_absolute", 3, 3, ("JPEG", None, 512))]
    cc.request_interrupt()
    assert mm.flag and cc.interrupt_requested()
    with pytest.raises(mm.InterruptProcessingException) as info:
        cc.check_interrupt()
    assert cc.is_interrupt(info.value)
    cc.send_ui_message("db.status", {"a": 1})
    assert ("send_sync", "db.status", {"a": 1}) in calls
    registered = []
    assert cc.register_routes(registered.append) is True
    assert registered and isinstance(registered[0], list)
    cc.free_comfy_memory()
    assert calls[-2:] == ["unload_all_models", "soft_empty_cache"]
    assert cc.comfy_torch_device() == "comfy-device"


def test_a_stray_comfy_module_alone_does_not_mean_comfyui(monkeypatch):
    monkeypatch.setitem(sys.modules, "comfy", types.ModuleType("comfy"))
    monkeypatch.delitem(sys.modules, "folder_paths", raising=False)
    assert not cc.in_comfyui()


def test_import_is_cheap():
    code = ("import sys; import comfyui_dreambooth.nodes.comfy_compat, comfyui_dreambooth.runner, "
            "comfyui_dreambooth.cli; heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# --- opt-in: against ComfyUI's real modules (COMFYUI_DIR = a ComfyUI source tree importable by this Python) --------
REAL_COMFY_SCRIPT = r'''
import os, sys, tempfile
sys.path.insert(0, os.environ["COMFYUI_DIR"])
import comfy.options
import comfy.cli_args
import torch
if not torch.cuda.is_available():
    comfy.cli_args.args.cpu = True
import folder_paths, comfy.utils, comfy.model_management as mm
from comfyui_dreambooth.nodes import comfy_compat as cc
from comfyui_dreambooth.nodes import terminal_progress

assert cc.in_comfyui()
tmp = tempfile.mkdtemp()
folder_paths.set_output_directory(os.path.join(tmp, "out"))
assert cc.output_directory() == os.path.join(tmp, "out")
assert cc.input_directory() == folder_paths.get_input_directory()
ckpts = os.path.join(tmp, "ckpts")
os.makedirs(os.path.join(ckpts, "sub"))
open(os.path.join(ckpts, "sub", "a.safetensors"), "wb").write(b"x")
folder_paths.add_model_folder_path("checkpoints", ckpts, is_default=True)
assert cc.models_folder("checkpoints") == ckpts, cc.models_folder("checkpoints")
assert "sub/a.safetensors" in cc.list_models("checkpoints"), cc.list_models("checkpoints")
assert cc.full_model_path("checkpoints", "sub/a.safetensors") == os.path.join(ckpts, "sub", "a.safetensors")
diffusers_root = os.path.join(tmp, "diffusers")
os.makedirs(os.path.join(diffusers_root, "m1"))
open(os.path.join(diffusers_root, "m1", "model_index.json"), "w").write("{}")
folder_paths.add_model_folder_path("diffusers", diffusers_root)
assert "m1" in cc.list_diffusers_folders()
assert cc.full_model_path("diffusers", "m1") == os.path.join(diffusers_root, "m1")
assert cc.models_folder("loras") == folder_paths.get_folder_paths("loras")[0]

seen = []
comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total)))
with cc.Progress(3) as progress:
    progress.update(1)
    progress.update_absolute(3)
assert seen == [(1, 3), (3, 3)], seen

cc.request_interrupt()
assert mm.processing_interrupted() and cc.interrupt_requested()
try:
    cc.check_interrupt()
    raise SystemExit("no interrupt raised")
except mm.InterruptProcessingException as exc:
    assert cc.is_interrupt(exc)
assert not cc.interrupt_requested()
cc.free_comfy_memory()
assert cc.comfy_torch_device() == mm.get_torch_device()
cc.send_ui_message("db.test", {})          # no server loaded: a no-op, not an import of ComfyUI's server
assert "server" not in sys.modules
print("REAL COMFY OK")
'''


@pytest.mark.skipif(not os.environ.get("COMFYUI_DIR"), reason="set COMFYUI_DIR to a ComfyUI source tree")
def test_against_real_comfyui_modules():
    done = subprocess.run([sys.executable, "-c", REAL_COMFY_SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "REAL COMFY OK" in done.stdout


def test_using_output_directory_restores_the_previous_one(tmp_path):
    cc.set_output_directory(tmp_path / "a")
    with cc.using_output_directory(tmp_path / "b"):
        assert cc.output_directory() == str(tmp_path / "b")
        assert cc.models_folder("checkpoints") == str(tmp_path / "b" / "checkpoints")
    assert cc.output_directory() == str(tmp_path / "a")
