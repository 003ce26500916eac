"""The reliability matrix: every hostile or broken input a user can give, and what happens (issue 10, point 6).

Each case is one row of the README's "Input → what happens" table (`python tests/reliability/test_matrix.py`
prints it; a test keeps the README in step). Outcomes are one of: a clear error (one message naming the file or
setting and the fix, never a traceback), handled (reported and skipped / repaired, the run goes on), or
identical (the result equals an undisturbed run). Deeper tests of each area live beside the modules' own tests.
"""
from __future__ import annotations

import errno
import io
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from typing import Callable

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from trainer_fixtures import load_tensors, make_concept, make_images, read_losses, same_tensors, tiny_settings  # noqa: E402

README = os.path.join(os.path.dirname(os.path.dirname(HERE)), "README.md")
TABLE_START, TABLE_END = "<!-- reliability-table:start -->", "<!-- reliability-table:end -->"


@dataclass
class Case:
    id: str
    input: str
    outcome: str
    run: Callable


CASES: list[Case] = []


def case(id: str, input: str, outcome: str):
    def register(fn):
        CASES.append(Case(id, input, outcome, fn))
        return fn
    return register


def _train(model, root, settings, concept, **kw):
    from comfyui_dreambooth.training.trainer import train

    return train(model, [concept], settings, output_root=str(root), **kw)


def _prepare(model, concept, tmp, **data):
    from comfyui_dreambooth.training.data.prepare import prepare_training_data

    return prepare_training_data(model, [concept], tiny_settings(data=data or None).data,
                                 cache_dir=str(tmp / "cache"), text_encoder_trained=False, batch_size=1)


def _no_traceback(message: str) -> None:
    assert "Traceback" not in message and message.strip()


# ---- images and folders -----------------------------------------------------------------------------------------
def _broken_images(folder):
    from PIL import Image

    buf = io.BytesIO()
    Image.effect_noise((64, 64), 64).convert("RGB").save(buf, format="PNG")
    (folder / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("a text file with an image name")


@case("bad-images-skip", "truncated, 0-byte and fake (text) image files in instance_dir, on_bad_image = skip",
      "handled: each file named in the report with its reason; training uses the good images")
def _(tmp, sd1):
    concept = make_concept(tmp, n=2)
    _broken_images(tmp / "instance")
    data = _prepare(sd1, concept, tmp, on_bad_image="skip")
    report = data.report_text()
    for name in ("truncated.png", "empty.jpg", "notes.png"):
        assert name in report
    assert data.examples_per_epoch == 2


@case("bad-images-stop", "the same broken files, on_bad_image = stop",
      "clear error listing every broken file before any work; nothing written")
def _(tmp, sd1):
    from comfyui_dreambooth.training.data.dataset import DatasetError

    concept = make_concept(tmp, n=2)
    _broken_images(tmp / "instance")
    with pytest.raises(DatasetError) as e:
        _prepare(sd1, concept, tmp, on_bad_image="stop")
    for name in ("truncated.png", "empty.jpg", "notes.png"):
        assert name in str(e.value)
    assert "on_bad_image" in str(e.value)


@case("odd-images", "16-bit grayscale, CMYK JPEG, palette PNG with transparency, EXIF-rotated JPEG",
      "handled: converted to RGB (transparency on background_color, rotation applied) and trained")
def _(tmp, sd1):
    import numpy as np
    from PIL import Image

    folder = tmp / "odd"
    folder.mkdir()
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(folder / "g16.png")
    Image.new("CMYK", (64, 64), (10, 200, 30, 0)).save(folder / "cmyk.jpg")
    Image.new("RGBA", (64, 64), (255, 0, 0, 0)).convert("P").save(folder / "pal.png", transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (64, 48), (0, 0, 255)).save(folder / "rot.jpg", exif=exif)
    from comfyui_dreambooth.training.data.settings import ConceptSettings

    concept = ConceptSettings(instance_dir=str(folder), instance_prompt="a photo of sks dog")
    data = _prepare(sd1, concept, tmp)
    assert data.examples_per_epoch == 4


@case("bomb", "an image header claiming 60000×60000 pixels (decompression bomb)",
      "handled: refused before decoding, named in the report")
def _(tmp, sd1):
    import struct
    import zlib

    folder = tmp / "instance"
    make_images(str(folder), 1)
    raw = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + raw
    png = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(raw)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    (folder / "bomb.png").write_bytes(png + b"\0" * 12 + b"IEND\xaeB`\x82")
    from comfyui_dreambooth.training.data.settings import ConceptSettings

    data = _prepare(sd1, ConceptSettings(instance_dir=str(folder), instance_prompt="sks"), tmp, on_bad_image="skip")
    assert "bomb.png" in data.report_text() and data.examples_per_epoch == 1


@case("empty-folder", "an instance_dir with no images (only a .txt)",
      "clear error naming the concept and the folder")
def _(tmp, sd1):
    from comfyui_dreambooth.training.data.dataset import DatasetError
    from comfyui_dreambooth.training.data.settings import ConceptSettings

    (tmp / "empty").mkdir()
    (tmp / "empty" / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="no usable images") as e:
        _prepare(sd1, ConceptSettings(instance_dir=str(tmp / "empty"), instance_prompt="sks"), tmp)
    assert str(tmp / "empty") in str(e.value)


@case("missing-folder", "an instance_dir that does not exist", "clear error naming the folder")
def _(tmp, sd1):
    from comfyui_dreambooth.training.data.dataset import DatasetError
    from comfyui_dreambooth.training.data.settings import ConceptSettings

    with pytest.raises((DatasetError, ValueError)) as e:
        _prepare(sd1, ConceptSettings(instance_dir=str(tmp / "nope"), instance_prompt="sks"), tmp)
    assert str(tmp / "nope") in str(e.value)
    _no_traceback(str(e.value))


@case("duplicates", "the same image three times under different names",
      "handled: reported as duplicates, trained once")
def _(tmp, sd1):
    concept = make_concept(tmp, n=2)
    first = tmp / "instance" / "img_0.png"
    for n in ("copy_a.png", "copy_b.png"):
        (tmp / "instance" / n).write_bytes(first.read_bytes())
    data = _prepare(sd1, concept, tmp)
    assert data.examples_per_epoch == 2 and "copy_a.png" in data.report_text()


@case("non-utf8-name", "an image whose file name is not UTF-8, captioned by [filewords]",
      "handled: the name is read with U+FFFD for the bad bytes; it trains")
def _(tmp, sd1):
    from comfyui_dreambooth.training.data.settings import ConceptSettings

    folder = tmp / "names"
    make_images(str(folder), 1)
    os.rename(folder / "img_0.png", os.path.join(os.fsencode(folder), b"dog \xff\xfe.png"))
    concept = ConceptSettings(instance_dir=str(folder), instance_prompt="[filewords]", instance_token="sks")
    data = _prepare(sd1, concept, tmp)
    assert data.examples_per_epoch == 1


# ---- settings -----------------------------------------------------------------------------------------------------
@case("impossible-settings", "batch_size 0, learning_rate NaN, lr_min above the learning rate, unknown optimizer",
      "clear error listing every problem at once, each naming the setting, the value and the allowed range")
def _(tmp, sd1):
    from comfyui_dreambooth.training.settings import SettingsError

    with pytest.raises(SettingsError) as e:
        tiny_settings(batch_size=0, learning_rate=float("nan"), optimizer="Nope", lr_scheduler="cosine",
                      lr_min=1.0).check()
    for name in ("batch_size", "learning_rate", "optimizer"):
        assert name in str(e.value)
    assert len(e.value.problems) >= 3


@case("warmup-too-long", "lr_warmup_steps longer than the whole run",
      "clear error naming lr_warmup_steps and the run length, before training")
def _(tmp, sd1):
    from comfyui_dreambooth.training.settings import SettingsError

    with pytest.raises(SettingsError, match="lr_warmup_steps = 99"):
        _train(sd1, tmp / "out", tiny_settings(lr_scheduler="constant_with_warmup", lr_warmup_steps=99,
                                               steps_per_image=1), make_concept(tmp, n=2))


@case("nothing-to-train", "train_unet off with a text-encoder ratio that gives the text encoder 0 steps",
      "clear error naming both settings and the smallest ratio that works")
def _(tmp, sd1):
    from comfyui_dreambooth.training.settings import SettingsError

    with pytest.raises(SettingsError, match="train_unet = False and text_encoder_ratio"):
        _train(sd1, tmp / "out", tiny_settings(train_unet=False, text_encoder_ratio=0.1, steps_per_image=1),
               make_concept(tmp, n=2))


# ---- model files --------------------------------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@case("pickle-payload", "a .ckpt whose pickle would run code (creates a file when unpickled)",
      "clear error: refused (weights_only); the payload never runs")
def _(tmp, sd1):
    import torch

    from comfyui_dreambooth.training.models import ModelLoadError, load_model

    marker = tmp / "pwned"
    path = tmp / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "evil": _Payload(str(marker))}, path)
    with pytest.raises(ModelLoadError, match="refused") as e:
        load_model(str(path))
    assert not marker.exists() and str(path) in str(e.value)


@case("bad-safetensors-header", "a .safetensors whose header points past the end of the file",
      "clear error naming the file: truncated or corrupt, copy it again")
def _(tmp, sd1):
    import json
    import struct

    from comfyui_dreambooth.training.models import ModelLoadError, load_model

    header = json.dumps({"x": {"dtype": "F32", "shape": [1000000], "data_offsets": [0, 4000000]}}).encode()
    path = tmp / "oob.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(ModelLoadError) as e:
        load_model(str(path))
    assert str(path) in str(e.value)


@case("truncated-model", "a model file cut in half by a failed download",
      "clear error naming the file")
def _(tmp, sd1):
    from comfyui_dreambooth.training.models import save_single_file
    from comfyui_dreambooth.training.models import ModelLoadError, load_model

    path = tmp / "cut.safetensors"
    save_single_file(sd1, str(path), dtype="fp16")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ModelLoadError) as e:
        load_model(str(path))
    assert str(path) in str(e.value)


@case("not-a-model", "a safetensors file that is not Stable Diffusion (a LoRA, a random tensor)",
      "clear error naming the file and what it holds")
def _(tmp, sd1):
    import torch
    from safetensors.torch import save_file

    from comfyui_dreambooth.training.models import ModelLoadError, load_model

    path = tmp / "lora.safetensors"
    save_file({"lora_unet_down.lora_up.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(ModelLoadError) as e:
        load_model(str(path))
    assert str(path) in str(e.value)


# ---- runs ---------------------------------------------------------------------------------------------------------
def _every_step_saved(stop_at=None):
    from comfyui_dreambooth.training.control import TrainingControl
    from comfyui_dreambooth.training.trainer import TrainCallbacks

    control, done = TrainingControl(), {"step": 0}

    def progress(p):
        done["step"] = p["step"]
        control.request_save()

    return TrainCallbacks(progress=progress, control=control,
                          should_stop=(lambda: done["step"] >= stop_at) if stop_at else None)


RUN_SETTINGS = dict(steps_per_image=3, keep_last_checkpoints=0, lora_dropout=0.1)


def _final(result):
    return load_tensors(os.path.join(result.run_dir, "final", "trainable.safetensors"))


_UNDISTURBED: dict = {}


def _undisturbed(tmp, sd1):
    """The final weights of the run that interrupted/killed runs must equal (trained once per module)."""
    if "weights" not in _UNDISTURBED:
        _UNDISTURBED["weights"] = _final(_train(sd1, tmp / "a", tiny_settings(**RUN_SETTINGS), make_concept(tmp, n=2)))
    return _UNDISTURBED["weights"]


@case("interrupt-resume", "Cancel (interrupt) mid-run, then queue again",
      "identical: resumes from the checkpoint written at the stop; final weights equal an uninterrupted run")
def _(tmp, sd1):
    from comfyui_dreambooth.training.trainer import TrainingInterrupted

    concept = make_concept(tmp, n=2)
    with pytest.raises(TrainingInterrupted):
        _train(sd1, tmp / "b", tiny_settings(**RUN_SETTINGS), concept, callbacks=_every_step_saved(stop_at=3))
    resumed = _train(sd1, tmp / "b", tiny_settings(**RUN_SETTINGS), concept)
    assert same_tensors(_undisturbed(tmp, sd1), _final(resumed))
    assert [r["step"] for r in read_losses(resumed.run_dir)] == list(range(1, 7))


KILLED = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, sys.argv[1])
    import torch
    torch.set_num_threads(1)
    from trainer_fixtures import make_concept, tiny_settings
    from comfyui_dreambooth.training.control import TrainingControl
    from comfyui_dreambooth.training.models import build_tiny_model
    from comfyui_dreambooth.training.trainer import TrainCallbacks, train
    mode, root, out = sys.argv[2], sys.argv[3], sys.argv[4]
    control = TrainingControl()
    def progress(p):
        control.request_save()
        print("step", p["step"], flush=True)
        if p["step"] == 3:
            if mode == "save":       # the next save is under way when the parent kills us
                import safetensors.torch as st
                real = st.save_file
                def slow(*a, **k):
                    real(*a, **k)
                    print("saving", flush=True)
                    time.sleep(60)
                st.save_file = slow
            else:
                print("mid-step", flush=True)
                time.sleep(60)
    settings = tiny_settings(steps_per_image=3, keep_last_checkpoints=0, lora_dropout=0.1)
    train(build_tiny_model("sd1"), [make_concept(root, n=2)], settings, output_root=out,
          callbacks=TrainCallbacks(progress=progress, control=control))
""")


def _kill_at(tmp, mode, word):
    proc = subprocess.Popen([sys.executable, "-c", KILLED, os.path.dirname(HERE), mode, str(tmp), str(tmp / "b")],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in proc.stdout:
        if line.strip() == word:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def _killed(tmp, sd1, mode, word):
    concept = make_concept(tmp, n=2)
    _kill_at(tmp, mode, word)
    resumed = _train(sd1, tmp / "b", tiny_settings(**RUN_SETTINGS), concept)
    assert same_tensors(_undisturbed(tmp, sd1), _final(resumed))
    assert [r["step"] for r in read_losses(resumed.run_dir)] == list(range(1, 7))
    ckpts = os.path.join(resumed.run_dir, "checkpoints")
    assert not [n for n in os.listdir(ckpts) if n.startswith(".")]


@case("kill-mid-step", "kill -9 of the training process in the middle of a step",
      "identical: the next start resumes from the last checkpoint; each step is logged once")
def _(tmp, sd1):
    _killed(tmp, sd1, "step", "mid-step")


@case("kill-mid-save", "kill -9 while a checkpoint is being written",
      "identical: the half-written checkpoint is invisible and removed at the next start; resume from the one before")
def _(tmp, sd1):
    _killed(tmp, sd1, "save", "saving")


@case("nan-loss", "the loss becomes NaN mid-run (too high a learning rate, fp16 overflow)",
      "clear error: stops at the broken step without saving it, names the last good checkpoint and what to change")
def _(tmp, sd1):
    from comfyui_dreambooth.training.setup import noise
    from comfyui_dreambooth.training.trainer import TrainingDiverged

    real, calls = noise.per_sample_mse, {"n": 0}

    def mse(pred, target):
        calls["n"] += 1
        return real(pred, target) * (float("nan") if calls["n"] == 3 else 1.0)

    noise.per_sample_mse = mse
    try:
        with pytest.raises(TrainingDiverged, match="step-0000002") as e:
            _train(sd1, tmp / "out", tiny_settings(**RUN_SETTINGS), make_concept(tmp, n=2),
                   callbacks=_every_step_saved())
    finally:
        noise.per_sample_mse = real
    assert "learning_rate" in str(e.value) and "step 3" in str(e.value)


@case("disk-full", "the disk fills up while a checkpoint is written",
      "clear error: the previous checkpoint is intact and named; the run resumes from it once there is room")
def _(tmp, sd1):
    from comfyui_dreambooth.training import checkpoints
    from comfyui_dreambooth.training.trainer import TrainingSaveError

    real = checkpoints.save_fp32_safetensors        # writes a checkpoint's trainable.safetensors
    calls = {"n": 0}

    def full(tensors, filename):
        if os.path.basename(filename) == "trainable.safetensors":
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename)

    concept = make_concept(tmp, n=2)
    checkpoints.save_fp32_safetensors = full
    try:
        with pytest.raises(TrainingSaveError, match="step-0000001"):
            _train(sd1, tmp / "out", tiny_settings(**RUN_SETTINGS), concept, callbacks=_every_step_saved())
    finally:
        checkpoints.save_fp32_safetensors = real
    resumed = _train(sd1, tmp / "out", tiny_settings(**RUN_SETTINGS), concept)
    assert [r["step"] for r in read_losses(resumed.run_dir)] == list(range(1, 7))


@case("two-runs-at-once", "a second process resumes the same run while the first still trains",
      "clear error: 'run in use by pid N'; the first run's files are untouched")
def _(tmp, sd1):
    from comfyui_dreambooth.training.runs import RunFolder, RunInUseError
    from comfyui_dreambooth.training.trainer import TrainingInterrupted

    concept = make_concept(tmp, n=2)
    with pytest.raises(TrainingInterrupted) as stopped:
        _train(sd1, tmp / "out", tiny_settings(**RUN_SETTINGS), concept, callbacks=_every_step_saved(stop_at=2))
    hold = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom comfyui_dreambooth.training.runs import "
                             "RunFolder\nwith RunFolder(sys.argv[1]).lock():\n    print('locked', flush=True)\n"
                             "    time.sleep(60)", stopped.value.run_dir], stdout=subprocess.PIPE, text=True)
    try:
        assert hold.stdout.readline().strip() == "locked"
        with pytest.raises(RunInUseError, match=f"pid {hold.pid}"):
            _train(sd1, tmp / "out", tiny_settings(**RUN_SETTINGS), concept)
    finally:
        hold.kill()
        hold.wait()
    assert RunFolder(stopped.value.run_dir).latest_checkpoint().endswith("step-0000002")


@case("damaged-checkpoint", "the newest checkpoint is truncated (crash, full disk, bad copy)",
      "handled: resume falls back to the newest checkpoint that loads and says which")
def _(tmp, sd1):
    from comfyui_dreambooth.training.runs import RunFolder
    from comfyui_dreambooth.training.trainer import TrainCallbacks, TrainingInterrupted

    concept = make_concept(tmp, n=2)
    with pytest.raises(TrainingInterrupted) as stopped:
        _train(sd1, tmp / "out", tiny_settings(**RUN_SETTINGS), concept, callbacks=_every_step_saved(stop_at=3))
    newest = RunFolder(stopped.value.run_dir).latest_checkpoint()
    open(os.path.join(newest, "trainable.safetensors"), "wb").close()
    said = []
    _train(sd1, tmp / "out", tiny_settings(**RUN_SETTINGS), concept, callbacks=TrainCallbacks(log=said.append))
    assert any("step-0000002" in s and "instead of the damaged" in s for s in said), said


@case("damaged-cache", "a latent cache entry whose data bytes are damaged under an intact header",
      "handled: the checksum fails, the entry is recomputed (never trained on as zeros/NaN)")
def _(tmp, sd1):
    concept = make_concept(tmp, n=2)
    _prepare(sd1, concept, tmp)
    entries = [os.path.join(r, f) for r, _, fs in os.walk(tmp / "cache" / "latents") for f in fs]
    with open(entries[0], "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        f.write(b"\0" * 64)
    data = _prepare(sd1, concept, tmp)
    assert data.report.cache["latents"]["recomputed"] == 1


# ---- outputs, folders, access -------------------------------------------------------------------------------------
@case("overwrite-user-folder", "convert / SaveDiffusers with overwrite onto a folder that is not a model (a user's "
      "folder, '.', a grouping folder holding alice/ and bob/ models)",
      "clear error naming the folder; nothing in it is deleted")
def _(tmp, sd1):
    from comfyui_dreambooth.training.fsutil import ReplaceRefusedError
    from comfyui_dreambooth.training.models import save_diffusers

    user = tmp / "photos"
    user.mkdir()
    (user / "holiday.jpg").write_bytes(b"precious")
    group = tmp / "people"
    for name in ("alice", "bob"):
        save_diffusers(sd1, str(group / name), dtype="fp16")
    for target in (user, group):
        with pytest.raises(ReplaceRefusedError) as e:
            save_diffusers(sd1, str(target), dtype="fp16")
        assert str(target) in str(e.value)
    assert (user / "holiday.jpg").read_bytes() == b"precious"
    assert (group / "alice" / "model_index.json").exists() and (group / "bob" / "model_index.json").exists()
    proc = subprocess.run([sys.executable, "-m", "comfyui_dreambooth", "convert", str(group / "alice"), str(user),
                           "--overwrite"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "photos" in proc.stderr
    _no_traceback(proc.stderr)
    assert (user / "holiday.jpg").read_bytes() == b"precious"


@case("symlink-loop", "a symlink loop inside a diffusers folder or a models folder (`up -> ..`)",
      "handled: every real folder is walked once; `info`, hashing and the model lists finish")
def _(tmp, sd1):
    import threading

    from comfyui_dreambooth.training.models import save_diffusers
    from comfyui_dreambooth.training.models.state_dict import file_hash

    folder = tmp / "model"
    save_diffusers(sd1, str(folder), dtype="fp16")
    os.symlink("..", folder / "unet" / "up")
    os.symlink(str(folder), folder / "vae" / "again")
    done = {}
    worker = threading.Thread(target=lambda: done.setdefault("hash", file_hash(str(folder))), daemon=True)
    worker.start()
    worker.join(60)
    assert "hash" in done, "hashing a folder with a symlink loop did not finish"


@case("path-outside-allowed", "on a ComfyUI server others can reach: an instance_dir, model path or resume folder "
      "outside ComfyUI's input/output/models folders (also through a symlinked sub-folder)",
      "clear error naming the input, the path and how to allow folders; the folder is not looked at")
def _(tmp, sd1):
    from comfyui_dreambooth.training.access import AccessPolicy, PathNotAllowedError

    inside, outside = tmp / "ComfyUI" / "input", tmp / "secret"
    inside.mkdir(parents=True)
    outside.mkdir()
    os.symlink(outside, inside / "link")
    policy = AccessPolicy(unrestricted=False, roots=(str(inside),), why_restricted="the server listens on 0.0.0.0")
    assert policy.check(str(inside / "dog"), what="ConceptDataset instance_dir")
    for path in (outside, inside / "link", inside / ".." / ".." / "secret"):
        with pytest.raises(PathNotAllowedError) as e:
            policy.check(str(path), what="ConceptDataset instance_dir")
        assert "ConceptDataset instance_dir" in str(e.value) and "allow" in str(e.value)


@case("env-var-in-path", "a path holding ${SECRET} or $HOME (e.g. instance_dir=/tmp/${OPENAI_API_KEY})",
      "clear error naming the path as typed: environment variables are never expanded, so no secret is shown")
def _(tmp, sd1):
    from comfyui_dreambooth.nodes.concepts import resolve_folder

    os.environ["DB_MATRIX_SECRET"] = "s3cr3t-value"
    try:
        resolved = resolve_folder("/tmp/${DB_MATRIX_SECRET}/dog")
    finally:
        del os.environ["DB_MATRIX_SECRET"]
    assert "s3cr3t-value" not in resolved and "${DB_MATRIX_SECRET}" in resolved


# ---- command line and workflows ---------------------------------------------------------------------------------
def _cli(*argv) -> tuple[int, str]:
    """`comfyui-dreambooth ARGV` in-process: (exit code, stderr)."""
    import contextlib

    from comfyui_dreambooth import cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main([str(a) for a in argv])
    return code, err.getvalue()


def _one_line_error(code, err, *needles):
    assert code == 1, (code, err)
    _no_traceback(err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and len(lines[0]) < 600, err[:2000]
    for needle in needles:
        assert needle in lines[0], lines[0]


def _model_file(tmp, sd1):
    from comfyui_dreambooth.training.models import save_single_file

    path = tmp / "tiny.safetensors"
    if not path.exists():
        save_single_file(sd1, str(path), dtype="fp32")
    return str(path)


@case("deep-workflow", "a workflow JSON nested 100,000 levels deep", "clear error: too deeply nested, not a workflow")
def _(tmp, sd1):
    path = tmp / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    _one_line_error(*_cli("run", path), "nested")


@case("long-path", "a 6,000-character path (`x/y/y/...`) as model, workflow or output folder",
      "clear error, the path shown shortened (start...end)")
def _(tmp, sd1):
    _one_line_error(*_cli("info", "x" + "/y" * 3000), "...", "model not found")


@case("pickle-in-folder", "a diffusers folder whose text_encoder/pytorch_model.bin carries a code-running pickle",
      "clear error naming the file: refused; the payload never runs")
def _(tmp, sd1):
    import torch

    from comfyui_dreambooth.training.models import save_diffusers

    folder = tmp / "model"
    save_diffusers(sd1, str(folder), dtype="fp32")
    te = folder / "text_encoder"
    for name in os.listdir(te):
        if name.endswith(".safetensors"):
            os.remove(te / name)
    marker = tmp / "pwned"
    torch.save({"evil": _Payload(str(marker))}, te / "pytorch_model.bin")
    _one_line_error(*_cli("info", folder), "pytorch_model.bin")
    assert not marker.exists()


@case("malformed-metadata", "a single file whose pack metadata is malformed (config a list, text_encoders a string)",
      "handled: one warning line naming the file; the architecture is read from the weights")
def _(tmp, sd1):
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = _model_file(tmp, sd1)
    with safe_open(src, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    for bad in ("[1, 2]", '{"family": "sd1", "text_encoders": "oops"}'):
        meta["comfyui_dreambooth.config"] = bad
        path = tmp / "odd.safetensors"
        save_file(tensors, str(path), metadata=meta)
        code, err = _cli("info", path)
        assert code == 0 and "warning" in err and "odd.safetensors" in err, err
        _no_traceback(err)


@case("bad-sample-numbers", "`sample --clip-skip 99`, `--clip-skip -1`, `--seed 2^64`, `--cfg nan`",
      "clear error naming the option and its allowed range; nothing written")
def _(tmp, sd1):
    model = _model_file(tmp, sd1)
    base = ["sample", model, "--prompt", "a dog", "--out", tmp / "x.png", "--steps", "1", "--width", "64",
            "--height", "64"]
    for option, value in (("--clip-skip", "99"), ("--clip-skip", "-1"), ("--seed", str(2**64)), ("--cfg", "nan")):
        _one_line_error(*_cli(*base, option, value), option)
    assert not (tmp / "x.png").exists()


@case("empty-output-dir", '`run --output-dir ""`', "clear error: an empty path is refused (not the current folder)")
def _(tmp, sd1):
    path = tmp / "wf.json"
    path.write_text("{}")
    _one_line_error(*_cli("run", path, "--output-dir", ""), "--output-dir")


@case("sample-overwrite", "`sample --out` naming an existing file",
      "clear error: refused unless --overwrite is given; the file is kept")
def _(tmp, sd1):
    model = _model_file(tmp, sd1)
    out = tmp / "keep.png"
    out.write_bytes(b"mine")
    _one_line_error(*_cli("sample", model, "--prompt", "a dog", "--out", out, "--steps", "1", "--width", "64",
                          "--height", "64"), "--overwrite")
    assert out.read_bytes() == b"mine"


@case("invalid-graph", "SampleTrained width 65, or a SaveLoRA name of 200 multi-byte characters, after a training node",
      "clear error before any node runs (the whole graph is validated first, as ComfyUI does)")
def _(tmp, sd1):
    from comfyui_dreambooth.nodes.models import SampleTrained
    from comfyui_dreambooth.nodes.save import SaveLoRA

    assert SampleTrained.VALIDATE_INPUTS(width=65, height=64) is not True
    assert SampleTrained.VALIDATE_INPUTS(width=64, height=64) is True
    assert SaveLoRA.VALIDATE_INPUTS(filename="é" * 200) is not True
    assert SaveLoRA.VALIDATE_INPUTS(filename="my_dog") is True


@case("control-route", "POST /dreambooth/control from a stale tab, a guessed node id or with a malformed body",
      "refused: 409 (stale run) / 404 (no such run) / 400 (bad body) in one JSON line; no other run is touched")
def _(tmp, sd1):
    from comfyui_dreambooth.nodes import live_routes

    assert live_routes.control_response({"node": "999", "run": "guess", "action": "stop_now"})[0] == 404
    assert live_routes.control_response(["not", "an", "object"])[0] == 400
    assert live_routes.control_response({"node": "1", "run": "r", "action": "rm -rf"})[0] == 400


# ---- issue 24: estimate, wizard, run --json, device precision ---------------------------------------------------
@case("cpu-half-frozen", "frozen_dtype fp16 or bf16 with mixed_precision fp16, trained on a CPU",
      "clear error: the CPU trains in fp32 (mixed_precision becomes 'no'); set frozen_dtype auto or use a GPU")
def _(tmp, sd1):
    from comfyui_dreambooth.training.settings import SettingsError

    for frozen in ("fp16", "bf16"):
        with pytest.raises(SettingsError) as e:
            _train(sd1, tmp / frozen, tiny_settings(mixed_precision="fp16", frozen_dtype=frozen),
                   make_concept(tmp, n=1), device="cpu")
        assert "CPU" in str(e.value) and "frozen_dtype 'auto'" in str(e.value), e.value
        assert "set mixed_precision to" not in str(e.value), e.value


@case("estimate-refused-settings", "`estimate --set batch_size=-3`, Prodigy + weights_dtype bf16, fp8 frozen weights in "
      "a full fine-tune, `--vram 1e308`; `wizard --resolution 0 / -512 / 100 / 8192`",
      "clear error naming the setting and its allowed range or fix (the trainer's own checks); no estimate")
def _(tmp, sd1):
    _one_line_error(*_cli("estimate", "sd15", "--set", "batch_size=-3"), "batch_size = -3", "1 to 256")
    _one_line_error(*_cli("estimate", "sd15", "--set", "optimizer=Prodigy", "--set", "weights_dtype=bf16", "--set",
                          "mixed_precision=bf16"), "Prodigy")
    _one_line_error(*_cli("estimate", "sd15", "--set", "use_lora=false", "--set", "frozen_dtype=fp8"), "fp8")
    _one_line_error(*_cli("estimate", "sd15", "--vram", "1e308"), "--vram", "at most")
    for resolution in ("0", "-512", "100", "8192"):
        _one_line_error(*_cli("wizard", "sd15", "--vram", "8", "--resolution", resolution), "--resolution")


@case("run-json-stdout", "`run --json --quiet` of a graph whose nodes print lines (the data node's \"scanning images\")",
      "handled: stdout holds the JSON alone; the pack's lines go to stderr")
def _(tmp, sd1):
    import contextlib
    import json

    from comfyui_dreambooth import cli, runner
    from comfyui_dreambooth.nodes import comfy_compat

    class Loud:
        RETURN_TYPES, FUNCTION, OUTPUT_NODE, CATEGORY = (), "go", True, "DreamBooth/test"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        def go(self):
            comfy_compat.log("scanning images")
            return {}

    path = tmp / "wf.json"
    path.write_text(json.dumps({"1": {"class_type": "Loud", "inputs": {}}}))
    out, err = io.StringIO(), io.StringIO()
    real = runner.pack_node_classes
    runner.pack_node_classes = lambda: {"Loud": Loud}
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(["run", str(path), "--json", "--quiet", "--output-dir", str(tmp / "o")])
    finally:
        runner.pack_node_classes = real
    assert code == 0, err.getvalue()
    assert json.loads(out.getvalue())["executed"] == ["1"] and "scanning images" in err.getvalue()


@case("many-unknown-nodes", "a workflow of 50,000 Note nodes (unknown to the headless runner)",
      "clear error in one short line: the first 10 node ids of each type, then \"and N more\"")
def _(tmp, sd1):
    import json

    path = tmp / "notes.json"
    path.write_text(json.dumps({str(i): {"class_type": "Note", "inputs": {}} for i in range(50_000)}))
    _one_line_error(*_cli("run", path, "--output-dir", tmp / "o"), "Note (node 0, 1,", "and 49990 more")


@case("wizard-empty-concepts", "PerformanceWizard with connected concepts whose folders hold 0 images",
      "clear error naming each concept folder: add images or check the paths")
def _(tmp, sd1):
    from comfyui_dreambooth.nodes.wizard import PerformanceWizard

    concept = make_concept(tmp, n=0)
    with pytest.raises(ValueError) as e:
        PerformanceWizard().choose(sd1, vram_gb=8.0, resolution=64, images=4, mode="lora", concept_type="person",
                                   concepts=[concept])
    assert concept.instance_dir in str(e.value) and "no training images" in str(e.value), e.value


@case("wizard-keeps-lora", "PerformanceWizard (mode auto) after a LoRA config; a SaveLoRA after a full fine-tune "
      "(use_lora off, or a wizard's choice)",
      "handled: the connected use_lora is kept (mode full overrides it); a SaveLoRA after a full fine-tune is a clear "
      "error before training (the whole-graph check, or the Train node before any work)")
def _(tmp, sd1):
    from comfyui_dreambooth.nodes.train import TrainDreamBooth
    from comfyui_dreambooth.nodes.wizard import PerformanceWizard
    from comfyui_dreambooth.training.settings import DreamBoothSettings

    config, _ = PerformanceWizard().choose(sd1, vram_gb=80.0, resolution=64, images=4, mode="auto",
                                           concept_type="person", config=DreamBoothSettings(use_lora=True))["result"]
    assert config.use_lora
    prompt = {"3": {"class_type": "TrainDreamBooth", "inputs": {}},
              "7": {"class_type": "SaveLoRA", "inputs": {"model": ["3", 0]}}}
    with pytest.raises(ValueError) as e:
        TrainDreamBooth().train(sd1, [make_concept(tmp, n=1)], tiny_settings(use_lora=False), unique_id="3",
                                prompt=prompt)
    assert "SaveLoRA (node 7)" in str(e.value) and "use_lora" in str(e.value)
    _no_traceback(str(e.value))


@case("wizard-imagic", "PerformanceWizard / `wizard` after DreamBoothImagic on a small card; `estimate` of an Imagic "
      "config that does not fit",
      "handled: only the savings Imagic trains with (never fused_backward, bf16 weights or fp8 frozen weights); the "
      "WARNING recommends only those")
def _(tmp, sd1):
    from comfyui_dreambooth.training.memory import estimate_report
    from comfyui_dreambooth.training.devices import DeviceMemory
    from comfyui_dreambooth.training.settings import DreamBoothSettings
    from comfyui_dreambooth.training.wizard import choose_settings

    imagic = DreamBoothSettings(train_imagic_only=True)
    for mode in ("auto", "lora", "full"):
        s = choose_settings("sd15", 2.0, images=1, mode=mode, base=imagic).settings
        assert s.validate(check_environment=False) == [] and not s.fused_backward and s.frozen_dtype == "auto"
    text = estimate_report("sdxl", imagic.replace(use_lora=False), DeviceMemory("a 2 GB card", 2 * 1024 ** 3))
    assert text.startswith("WARNING") and "fused_backward" not in text.splitlines()[0]


@case("estimate-workflow-chain", "`estimate --workflow` of a graph with a PerformanceWizard (its nodes in any order), "
      "or with two Train nodes",
      "handled: the chain that feeds each Train node is computed, the wizard included; each Train node is estimated "
      "and named")
def _(tmp, sd1):
    import contextlib
    import json

    from comfyui_dreambooth import cli

    nodes = {"13": {"class_type": "TrainDreamBooth", "inputs": {"config": ["12", 0]}},
             "15": {"class_type": "TrainDreamBooth", "inputs": {"config": ["11", 0]}},
             "12": {"class_type": "PerformanceWizard", "inputs": {"config": ["11", 0], "vram_gb": 8.0,
                                                                  "resolution": 512, "images": 4, "mode": "lora",
                                                                  "concept_type": "person"}},
             "11": {"class_type": "DreamBoothSettings", "inputs": {"use_lora": False}}}
    path = tmp / "wf.json"
    path.write_text(json.dumps(nodes))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(["estimate", "sd15", "--workflow", str(path), "--json"]) == 0
    trains = json.loads(out.getvalue())["trains"]
    assert [t["settings"]["use_lora"] for t in trains] == [True, False]


@case("edited-run-config", "a run folder whose config.json was edited by hand (learning_rate, total_steps, run_id), "
      "or is no longer JSON, a JSON array, missing or marked finished, then resume auto",
      "handled: an edited config.json is named and written back as trained, and the run continues identically; a "
      "run whose config.json hides it is kept, named with the reason, and a new run starts")
def _(tmp, sd1):
    import json

    from comfyui_dreambooth.training.trainer import TrainCallbacks, TrainingInterrupted

    concept = make_concept(tmp, n=2)
    with pytest.raises(TrainingInterrupted) as stopped:
        _train(sd1, tmp / "b", tiny_settings(**RUN_SETTINGS), concept, callbacks=_every_step_saved(stop_at=3))
    path = os.path.join(stopped.value.run_dir, "config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["settings"]["learning_rate"], cfg["total_steps"] = 0.5, 99
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f)
    lines = []
    resumed = _train(sd1, tmp / "b", tiny_settings(**RUN_SETTINGS), concept, callbacks=TrainCallbacks(log=lines.append))
    assert resumed.run_dir == stopped.value.run_dir and same_tensors(_undisturbed(tmp, sd1), _final(resumed))
    assert any(line.startswith("resume: ") and "learning_rate" in line for line in lines), lines
    with open(path, encoding="utf-8") as f:
        assert json.load(f)["total_steps"] == 6
    with pytest.raises(TrainingInterrupted) as stopped:
        _train(sd1, tmp / "c", tiny_settings(**RUN_SETTINGS), concept, callbacks=_every_step_saved(stop_at=1))
    with open(os.path.join(stopped.value.run_dir, "config.json"), "w", encoding="utf-8") as f:
        f.write("{ not json")
    lines = []
    fresh = _train(sd1, tmp / "c", tiny_settings(**RUN_SETTINGS), concept, callbacks=TrainCallbacks(log=lines.append))
    assert fresh.run_dir != stopped.value.run_dir
    assert any(stopped.value.run_dir in line and "not JSON" in line for line in lines), lines
    with open(os.path.join(fresh.run_dir, "config.json"), "w", encoding="utf-8") as f:
        f.write("[]")                                  # a finished run hidden so is simply not reused
    lines = []
    _train(sd1, tmp / "c", tiny_settings(**RUN_SETTINGS), concept, callbacks=TrainCallbacks(log=lines.append))


@case("resume-refused-early", "resume naming a run folder that has no checkpoint, or a path that is no run",
      "clear error naming the folder, before any work (no latent cache written)")
def _(tmp, sd1):
    empty = tmp / "out" / "dreambooth" / "other-20260101-000000"
    os.makedirs(empty / "checkpoints")
    (empty / "config.json").write_text("{}")
    for resume, needle in ((empty, "no checkpoint yet"), (tmp / "nowhere", "neither")):
        with pytest.raises(ValueError, match=needle) as e:
            _train(sd1, tmp / "out", tiny_settings(), make_concept(tmp, n=1), resume=str(resume))
        assert str(resume) in str(e.value) or repr(str(resume)) in str(e.value)
    assert not os.path.exists(tmp / "out" / "dreambooth" / "cache")


@case("num-processes-refused", "`run --num-processes 0`, `-1` or more than the machine's GPUs (CPU cores without one); "
      "`run --num-processes 2` of a workflow whose settings have fused_backward or Imagic on",
      "clear error in one line, before any process starts")
def _(tmp, sd1):
    import json

    _one_line_error(*_cli("run", tmp / "wf.json", "--num-processes", "0"), "--num-processes 0", "1 or more")
    _one_line_error(*_cli("run", tmp / "wf.json", "--num-processes", "-1"), "--num-processes -1", "1 or more")
    import torch
    if not torch.cuda.is_available():
        many = (os.cpu_count() or 1) + 1
        _one_line_error(*_cli("run", tmp / "wf.json", "--num-processes", many), f"--num-processes {many}", "CPU core")
    path = tmp / "imagic.json"
    path.write_text(json.dumps({"1": {"class_type": "DreamBoothImagic", "inputs": {"train_imagic_only": True}},
                                "2": {"class_type": "TrainDreamBooth", "inputs": {"config": ["1", 0]}}}))
    _one_line_error(*_cli("run", path, "--num-processes", "2", "--output-dir", tmp / "o"), "train_imagic_only",
                    "node 2 (TrainDreamBooth)")


@case("sigterm-run", "SIGTERM to `run` during training (one process, or `--num-processes 2`); Ctrl-C or SIGTERM "
      "during start-up under `--num-processes`, also when started with SIGINT ignored (`cmd &` from a script)",
      "handled: training stops at the next step (every process at the same one) and saves a checkpoint; at start-up "
      "the processes end; one line, exit 130, no traceback, no process left (tests/test_multiprocess.py)")
def _(tmp, sd1):
    import json

    from comfyui_dreambooth import demo

    out = tmp / "out"
    demo.make_tiny_checkpoint(str(out / "checkpoints" / demo.CHECKPOINT_NAME))
    concept = out / "input" / "concept"
    demo.make_concept_images(str(concept), count=2)
    cmd = [sys.executable, "-m", "comfyui_dreambooth", "run", demo.example_workflow_path(), "--output-dir", str(out)]
    for o in demo.demo_overrides(demo.CHECKPOINT_NAME, str(concept), epochs=400):
        cmd += ["--set", o]
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__import__("comfyui_dreambooth").__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": package_parent}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if "training " in line and " steps (" in line:
                break
        import time
        time.sleep(2)
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=240)
    output = "".join(seen) + rest
    assert proc.returncode == 130, output[-3000:]
    assert "terminate requested" in output and "Traceback" not in output, output[-3000:]
    (run,) = [d for d in (out / "dreambooth").iterdir() if (d / "config.json").exists()]
    assert not json.loads((run / "config.json").read_text())["finished"]
    assert [d for d in (run / "checkpoints").iterdir() if (d / "state.json").exists()], output[-3000:]


@case("wizard-out-of-range", "PerformanceWizard vram_gb -1 / NaN / inf / 1e308 or resolution 100 / -64 / 8192 (an API "
      "workflow, `estimate --workflow`)",
      "clear error naming the input and its range; no settings chosen")
def _(tmp, sd1):
    from comfyui_dreambooth.nodes.wizard import PerformanceWizard

    for change in (dict(vram_gb=-1.0), dict(vram_gb=float("nan")), dict(vram_gb=1e308), dict(resolution=100),
                   dict(resolution=8192)):
        with pytest.raises(ValueError) as e:
            PerformanceWizard().choose(sd1, **(dict(vram_gb=8.0, resolution=64, images=4, mode="auto",
                                                     concept_type="person") | change))
        assert next(iter(change)) in str(e.value), e.value
        _no_traceback(str(e.value))


# ---- the matrix -------------------------------------------------------------------------------------------------
# cases over ~3 s each on a 2-core machine: `pytest -m slow` (CI runs both)
SLOW_CASES = {"kill-mid-save", "kill-mid-step", "overwrite-user-folder", "bad-images-skip", "interrupt-resume",
              "sigterm-run", "edited-run-config",
              "disk-full", "damaged-checkpoint", "nan-loss"}


@pytest.mark.parametrize("c", [pytest.param(c, marks=pytest.mark.slow) if c.id in SLOW_CASES else c for c in CASES],
                         ids=[c.id for c in CASES])
def test_case(c, tmp_path, sd1, single_thread):
    c.run(tmp_path, sd1)


def table() -> str:
    rows = ["| input | what happens |", "|---|---|"]
    rows += [f"| {c.input} | {c.outcome} |" for c in CASES]
    return "\n".join(rows)


def test_readme_table_lists_every_case():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    assert TABLE_START in text and TABLE_END in text, "README lacks the reliability table markers"
    current = text.split(TABLE_START)[1].split(TABLE_END)[0].strip()
    assert current == table(), "README's reliability table is out of date: python tests/reliability/test_matrix.py"


if __name__ == "__main__":
    print(table())
