"""Imagic (training/imagic.py): two stages on one photo, the embeddings carried, sampled, saved and resumed.

Tiny model, 64 px, 3 + 3 steps; stage checks compare losses on fixed draws (not the noisy per-step log).
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from trainer_fixtures import make_concept, tiny_settings

from comfyui_dreambooth.training import imagic
from comfyui_dreambooth.training.settings import SettingsError
from comfyui_dreambooth.training.trainer import TrainCallbacks, TrainingInterrupted, train

pytestmark = pytest.mark.usefixtures("single_thread")

TARGET = "a photo of a sitting dog"


def _settings(**changes):
    kw = dict(train_imagic_only=True, imagic_embed_steps=3, imagic_unet_steps=3, imagic_embed_lr=5e-2,
              imagic_unet_lr=1e-3, use_lora=True)
    kw.update(changes)
    return tiny_settings(**kw)


def _concept(root, n=1):
    return make_concept(root, n=n, instance_prompt=TARGET)


def _sample(model, alpha, seed=3):
    from comfyui_dreambooth.training.sampling import generate

    return generate(model, "ignored", steps=2, cfg=3.0, seed=seed, width=64, height=64, scheduler="ddim",
                    imagic_alpha=alpha)


@pytest.fixture(scope="module")
def run(sd1, tmp_path_factory):
    root = tmp_path_factory.mktemp("imagic")
    concept = _concept(root / "data")
    progress = []
    result = train(sd1, [concept], _settings(), output_root=str(root / "out"), resume="new",
                   callbacks=TrainCallbacks(progress=progress.append))
    return {"root": root, "concept": concept, "result": result, "progress": progress}


def test_two_stages_run_log_and_carry_the_embeddings(run):
    result = run["result"]
    records = [json.loads(line) for line in open(os.path.join(result.run_dir, "loss.jsonl"))]
    assert [r["stage"] for r in records] == [1, 1, 1, 2, 2, 2]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert [p["stage"] for p in run["progress"]] == ["embedding"] * 3 + ["unet"] * 3
    cfg = json.load(open(os.path.join(result.run_dir, "config.json")))
    assert cfg["finished"] and cfg["imagic"]["target_text"] == TARGET and cfg["settings"]["train_imagic_only"]
    model = result.model
    assert imagic.is_imagic(model)
    e_tgt, e_opt = model.extras[imagic.TARGET_KEY], model.extras[imagic.OPTIMIZED_KEY]
    assert e_tgt.shape == e_opt.shape and e_tgt.shape[0] == 1 and e_tgt.shape[1] == 77
    assert not torch.equal(e_tgt, e_opt)                      # stage 1 moved the embedding away from the target's


@pytest.mark.slow
def test_stage1_lowers_its_loss_and_stage2_lowers_its_loss(sd1, run):
    """Loss on fixed draws: optimised embedding (frozen base UNet) < target embedding; fine-tuned UNet < base UNet
    (both with the optimised embedding)."""
    import numpy as np
    from diffusers import DDPMScheduler
    from PIL import Image

    from comfyui_dreambooth.training.models.components import SD_NOISE_SCHEDULE

    model = run["result"].model
    image_path = os.path.join(run["concept"].instance_dir, "img_0.png")
    pixels = torch.from_numpy(np.asarray(Image.open(image_path).convert("RGB"), dtype=np.float32) / 127.5 - 1)
    with torch.no_grad():
        latents = sd1.vae.encode(pixels.permute(2, 0, 1)[None]).latent_dist.mean * sd1.vae.config.scaling_factor
    sched = DDPMScheduler.from_config(SD_NOISE_SCHEDULE)
    gen = torch.Generator().manual_seed(0)
    n = 32
    noise = torch.randn((n, *latents.shape[1:]), generator=gen)
    t = torch.randint(0, 1000, (n,), generator=gen)
    noisy = sched.add_noise(latents.expand(n, -1, -1, -1), noise, t)

    def loss(unet, embeds):
        with torch.no_grad():
            return float(((unet(noisy, t, embeds.expand(n, -1, -1)).sample - noise) ** 2).mean())

    e_tgt, e_opt = model.extras[imagic.TARGET_KEY], model.extras[imagic.OPTIMIZED_KEY]
    assert loss(sd1.unet, e_opt) < loss(sd1.unet, e_tgt)              # stage 1
    assert loss(model.unet, e_opt) < loss(sd1.unet, e_opt)            # stage 2


@pytest.mark.slow
def test_alpha_changes_the_image_and_is_deterministic(run, sd1):
    model = run["result"].model
    a0, a1 = _sample(model, 0.0), _sample(model, 1.0)
    assert not torch.equal(a0, a1)
    assert torch.equal(a0, _sample(model, 0.0))
    assert not torch.equal(_sample(model, 0.7), a0)
    # a non-Imagic model ignores imagic_alpha
    from comfyui_dreambooth.training.sampling import generate

    base = [generate(sd1, "a photo", steps=2, seed=1, width=64, height=64, scheduler="ddim", imagic_alpha=a)
            for a in (0.0, 1.0)]
    assert torch.equal(*base)


def test_save_and_load_sample_the_same(run, tmp_path):
    from comfyui_dreambooth.training.export.checkpoint import export_checkpoint, export_diffusers
    from comfyui_dreambooth.training.export.lora import save_kohya_lora
    from comfyui_dreambooth.training.models import load_model

    model = run["result"].model
    want = _sample(model, 0.7)
    for path in (export_checkpoint(model, str(tmp_path / "imagic.safetensors"), dtype="fp32"),
                 export_diffusers(model, str(tmp_path / "imagic_diffusers"), dtype="fp32")):
        loaded = load_model(path)
        assert imagic.is_imagic(loaded), path
        assert torch.equal(loaded.extras[imagic.OPTIMIZED_KEY], model.extras[imagic.OPTIMIZED_KEY])
        assert torch.allclose(_sample(loaded, 0.7), want, atol=1e-5), path
    lora = save_kohya_lora(model, str(tmp_path / "imagic_lora.safetensors"), dtype="fp32")
    side = imagic.load_sidecar(lora)
    assert os.path.exists(imagic.sidecar_path(lora))
    assert torch.equal(side[imagic.TARGET_KEY], model.extras[imagic.TARGET_KEY])
    assert torch.equal(side[imagic.OPTIMIZED_KEY], model.extras[imagic.OPTIMIZED_KEY])


@pytest.mark.parametrize("n", [0, 2])
def test_refuses_other_than_one_image_before_any_work(sd1, tmp_path, n):
    concept = _concept(tmp_path / "data", n=n)
    with pytest.raises(SettingsError) as info:
        train(sd1, [concept], _settings(learning_rate=-1.0), output_root=str(tmp_path / "out"), resume="new")
    text = str(info.value)
    assert concept.instance_dir in text and f"holds {n} images" in text
    assert "learning_rate" in text                                  # every problem at once
    assert not os.path.exists(tmp_path / "out" / "dreambooth")       # nothing written


def test_a_finished_identical_run_is_reused_from_its_weights(sd1, run, tmp_path):
    """The finished run's result again without training: the optimised embedding and the UNet come from the final
    state's weights (its optimizer state is not read: here it is gone)."""
    import shutil

    from comfyui_dreambooth.training.runs import RunFolder

    out = tmp_path / "out"
    shutil.copytree(run["root"] / "out", out)
    copied = RunFolder(str(out / os.path.relpath(run["result"].run_dir, run["root"] / "out")))
    os.remove(os.path.join(copied.final_dir, "optimizer.pt"))
    again = train(sd1, [run["concept"]], _settings(), output_root=str(out), resume="auto")
    want = run["result"].model
    assert again.reused and again.run_dir == copied.path and again.steps == run["result"].steps
    assert torch.equal(again.model.extras[imagic.OPTIMIZED_KEY], want.extras[imagic.OPTIMIZED_KEY])
    for (name, a), (_, b) in zip(sorted(again.model.unet.state_dict().items()),
                                 sorted(want.unet.state_dict().items())):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("stop_at", [2, 5])          # mid stage 1, mid stage 2
def test_resume_mid_stage_is_identical(sd1, run, tmp_path, stop_at):
    steps = []

    def should_stop():
        return len(steps) >= stop_at

    cb = TrainCallbacks(progress=lambda p: steps.append(p["step"]), should_stop=should_stop)
    out = str(tmp_path / "out")
    with pytest.raises(TrainingInterrupted) as info:
        train(sd1, [run["concept"]], _settings(), output_root=out, resume="new", callbacks=cb)
    assert info.value.step == stop_at
    stopped = info.value.result            # issue 23.2: the stopped run's model, for the node to hand on
    assert stopped.steps == stop_at and stopped.run_dir == info.value.run_dir
    assert imagic.OPTIMIZED_KEY in stopped.model.extras and stopped.final_loss is not None
    state = json.load(open(os.path.join(info.value.checkpoint, "state.json")))
    assert state["stage"] == (1 if stop_at <= 3 else 2)
    resumed = train(sd1, [run["concept"]], _settings(), output_root=out, resume="auto")
    assert resumed.run_dir == info.value.run_dir and not resumed.reused
    want = run["result"].model
    assert torch.equal(resumed.model.extras[imagic.OPTIMIZED_KEY], want.extras[imagic.OPTIMIZED_KEY])
    for (name, a), (_, b) in zip(sorted(resumed.model.unet.state_dict().items()),
                                 sorted(want.unet.state_dict().items())):
        assert torch.equal(a, b), name
    logged = [json.loads(line) for line in open(os.path.join(resumed.run_dir, "loss.jsonl"))]
    wanted = [json.loads(line) for line in open(os.path.join(run["result"].run_dir, "loss.jsonl"))]
    assert [r["loss"] for r in logged] == [r["loss"] for r in wanted]


class _Said(Exception):
    pass


@pytest.mark.parametrize("changes, line", [
    (dict(text_encoder_ratio=0.5), "Imagic: text_encoder_ratio does not apply"),
    (dict(text_encoder_ratio=0.5, use_ema=True), "Imagic: use_ema, text_encoder_ratio do not apply"),
])
def test_the_ignored_settings_line_agrees_in_number(sd1, tmp_path, changes, line):
    """Issue 24.11: "Imagic: text_encoder_ratio do not apply"."""
    said = []

    def log(message):
        said.append(message)
        if message.startswith("Imagic:"):
            raise _Said

    with pytest.raises(_Said):
        train(sd1, [_concept(tmp_path / "data")], _settings(**changes), output_root=str(tmp_path / "out"),
              resume="new", callbacks=TrainCallbacks(log=log))
    assert said[-1].startswith(line), said[-1]
