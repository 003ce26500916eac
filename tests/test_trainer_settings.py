"""Each training setting takes effect: one small tiny-model run per setting, checked on what it must change
(weights, checkpoints, loss log, timing, callbacks) and, where it must not change something, on that too."""
import math
import os
import time

import pytest
import torch

from trainer_fixtures import (load_tensors, make_concept, make_images, module_hash, read_losses,
                              same_tensors, tiny_settings)


pytestmark = pytest.mark.usefixtures("single_thread")   # conftest: one torch thread, a fresh tiny sd1 per module


def _train(model, tmp_path, settings, concept=None, **kw):
    from comfyui_dreambooth.training.trainer import train

    concept = concept or make_concept(tmp_path)
    return train(model, [concept], settings, output_root=str(tmp_path / "out"), **kw)


def _losses(result):
    return [r["loss"] for r in read_losses(result.run_dir)]


def _te_tensors(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith("te0.")}


def _unet_tensors(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith("unet.")}


# ---- text encoder ------------------------------------------------------------------------------------------------
def test_text_encoder_ratio_zero_leaves_it_untouched(sd1, tmp_path):
    result = _train(sd1, tmp_path, tiny_settings(use_lora=False, learning_rate=1e-3, steps_per_image=0,
                                                 max_train_steps=2, text_encoder_ratio=0.0))
    assert module_hash(result.model.text_encoders[0]) == module_hash(sd1.text_encoders[0])
    assert module_hash(result.model.unet) != module_hash(sd1.unet)


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_text_encoder_trains_for_ratio_of_steps_then_stays_frozen(sd1, tmp_path, use_lora):
    """4 steps, ratio 0.5: the text encoder changes at steps 1-2 and is bit-identical from step 2 on, while the
    UNet keeps training. A checkpoint per step (requested through TrainingControl) shows every state."""
    from comfyui_dreambooth.training.control import TrainingControl
    from comfyui_dreambooth.training.trainer import TrainCallbacks

    control = TrainingControl()
    settings = tiny_settings(use_lora=use_lora, learning_rate=1e-3, steps_per_image=0, max_train_steps=4,
                             text_encoder_ratio=0.5, keep_last_checkpoints=0)
    result = _train(sd1, tmp_path, settings, callbacks=TrainCallbacks(
        progress=lambda p: control.request_save(), control=control))
    ckpts = sorted(os.listdir(os.path.join(result.run_dir, "checkpoints")))
    assert ckpts == [f"step-{s:07d}" for s in range(1, 5)]
    states = [load_tensors(os.path.join(result.run_dir, "checkpoints", c, "trainable.safetensors")) for c in ckpts]
    te = [_te_tensors(s) for s in states]
    unet = [_unet_tensors(s) for s in states]
    assert te[0] and unet[0]
    base = _te_tensors({f"te0.{k}": v for k, v in sd1.text_encoders[0].state_dict().items()})
    if not use_lora:
        assert not same_tensors({k: base[k] for k in te[0]}, te[0])                # trains at step 1 ...
    assert not same_tensors(te[0], te[1])                                          # ... and 2
    assert all(same_tensors(te[1], t) for t in te[2:])                             # frozen after 0.5 x 4
    assert all(not same_tensors(a, b) for a, b in zip(unet[1:], unet[2:]))           # the UNet goes on
    final = _te_tensors(load_tensors(os.path.join(result.run_dir, "final", "trainable.safetensors")))
    assert same_tensors(final, te[1])


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_clip_norm(sd1, tmp_path, freeze):
    result = _train(sd1, tmp_path, tiny_settings(use_lora=False, learning_rate=1e-3, steps_per_image=0,
                                                 max_train_steps=2, text_encoder_ratio=1.0, freeze_clip_norm=freeze))
    base = sd1.text_encoders[0].state_dict()
    trained = result.model.text_encoders[0].state_dict()
    norms = [k for k in base if "layer_norm" in k]
    others = [k for k in base if "layer_norm" not in k and "proj" in k]
    assert norms and others
    assert all(torch.equal(base[k], trained[k]) for k in norms) == freeze
    assert all(not torch.equal(base[k], trained[k]) for k in others)


# ---- EMA ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_ema_weights_differ_from_raw_weights(sd1, tmp_path, use_lora):
    result = _train(sd1, tmp_path, tiny_settings(use_lora=use_lora, learning_rate=1e-3, steps_per_image=0,
                                                 max_train_steps=3, use_ema=True, ema_decay=0.9))
    ema, raw = result.model.ema_unet, result.model.unet
    assert ema is not None and ema is not raw
    trained_names = [n for n, _ in raw.named_parameters() if not use_lora or "lora_" in n]
    ema_p, raw_p, base_p = dict(ema.named_parameters()), dict(raw.named_parameters()), dict(sd1.unet.named_parameters())
    assert any(not torch.equal(ema_p[n], raw_p[n]) for n in trained_names)
    if not use_lora:
        # the average lies between the start and the end: closer to the base than the last weights are
        n = "conv_in.weight"
        assert (ema_p[n] - base_p[n]).norm() < (raw_p[n] - base_p[n]).norm()
    assert os.path.exists(os.path.join(result.run_dir, "final", "ema.pt"))


def test_no_ema_without_use_ema(sd1, tmp_path):
    result = _train(sd1, tmp_path, tiny_settings(steps_per_image=0, max_train_steps=1))
    assert result.model.ema_unet is None


# ---- learning rate ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", [
    dict(lr_scheduler="linear_with_warmup", lr_warmup_steps=2),
    dict(lr_scheduler="cosine_with_restarts", lr_cycles=2, lr_min=1e-4),
    dict(lr_scheduler="polynomial", lr_power=2.0, lr_warmup_steps=1),
], ids=lambda d: d["lr_scheduler"])
@pytest.mark.slow
def test_logged_learning_rate_follows_the_schedule(sd1, tmp_path, schedule):
    from comfyui_dreambooth.training.setup.schedulers import lr_at

    settings = tiny_settings(steps_per_image=0, max_train_steps=6, **schedule)
    result = _train(sd1, tmp_path, settings)
    records = read_losses(result.run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    expected = [lr_at(i, settings, 6) for i in range(6)]          # record of step i+1: the rate step i+1 used
    assert [r["lr"] for r in records] == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert len(set(expected)) > 2


# ---- noise and loss --------------------------------------------------------------------------------------------
@pytest.fixture
def spied_noise(monkeypatch):
    """Records every noise tensor and timestep batch the trainer draws."""
    from comfyui_dreambooth.training.setup import noise

    seen = {"noise": [], "t": []}
    real_noise, real_t = noise.sample_noise, noise.sample_timesteps

    def sample_noise(latents, offset_noise=0.0, generator=None):
        out = real_noise(latents, offset_noise, generator)
        seen["noise"].append(out.clone())
        return out

    def sample_timesteps(scheduler, batch_size, generator=None, device=None):
        out = real_t(scheduler, batch_size, generator, device)
        seen["t"].append(out.clone())
        return out

    monkeypatch.setattr(noise, "sample_noise", sample_noise)
    monkeypatch.setattr(noise, "sample_timesteps", sample_timesteps)
    return seen


def _first_step_loss(sd1, tmp_path, name, **changes):
    return _losses(_train(sd1, tmp_path / name, tiny_settings(steps_per_image=0, max_train_steps=1, **changes)))[0]


def test_offset_noise_shifts_the_noise_mean_per_channel_and_changes_the_loss(sd1, tmp_path, spied_noise):
    plain = _first_step_loss(sd1, tmp_path, "plain")
    offset = _first_step_loss(sd1, tmp_path, "offset", offset_noise=0.5)
    plain_noise, offset_noise = spied_noise["noise"]
    channel_means = lambda n: n.mean(dim=(2, 3)).abs().max().item()   # noqa: E731
    assert channel_means(plain_noise) < 0.2 < channel_means(offset_noise)
    assert offset != plain


GAMMA = 0.01


def test_min_snr_gamma_weights_the_loss_by_min_snr_over_snr(sd1, tmp_path, spied_noise):
    from comfyui_dreambooth.training.setup.noise import build_noise_scheduler, compute_snr

    plain = _first_step_loss(sd1, tmp_path, "plain")
    # a gamma below the SNR of almost every timestep (the schedule's smallest is ~0.005), so the weight differs
    weighted = _first_step_loss(sd1, tmp_path, "minsnr", min_snr_gamma=GAMMA)
    t_plain, t_weighted = spied_noise["t"]
    assert torch.equal(t_plain, t_weighted) and torch.equal(*spied_noise["noise"])   # same draws
    snr = compute_snr(build_noise_scheduler(tiny_settings(), "epsilon"), t_plain).item()
    assert snr > GAMMA
    assert weighted == pytest.approx(plain * min(snr, GAMMA) / snr, rel=1e-5)
    assert weighted != plain


# ---- prior preservation ---------------------------------------------------------------------------------------
def _concept_with_class_images(tmp_path, **changes):
    class_dir = make_images(str(tmp_path / "class"), 2, seed=7)
    return make_concept(tmp_path, n=2, class_dir=class_dir, num_class_images_per_image=1, **changes)


@pytest.mark.parametrize("where", ["settings", "concept"])
def test_prior_preservation_uses_class_images_with_their_loss_weight(sd1, tmp_path, where):
    """Batch size 1: 2 instance + 2 class examples per epoch; with prior weight 0 exactly the class steps log 0."""
    concept = _concept_with_class_images(tmp_path, prior_loss_weight=0.0 if where == "concept" else 1.0)
    settings = tiny_settings(steps_per_image=1, prior_loss_weight=0.0 if where == "settings" else None)
    result = _train(sd1, tmp_path, settings, concept=concept)
    losses = _losses(result)
    assert len(losses) == 4
    assert sum(1 for x in losses if x == 0.0) == 2 and all(x > 0 for x in losses if x != 0.0)
    assert len(os.listdir(tmp_path / "class")) == 2                       # nothing generated
    report = result.info["dataset_report"]["concepts"][0]
    assert report["class_present"] == 2 and report["class_generated"] == 0 and report["prior_examples_per_epoch"] == 2


@pytest.mark.slow
def test_prior_mode_base_model_uses_the_class_prompt_and_no_class_images(sd1, tmp_path, monkeypatch):
    from comfyui_dreambooth.training.models import text

    prompts = []
    real_encode = text.encode_prompts

    def encode_spy(model, prompts_, *a, **kw):
        prompts.extend(prompts_)
        return real_encode(model, prompts_, *a, **kw)

    monkeypatch.setattr(text, "encode_prompts", encode_spy)
    class_dir = tmp_path / "class"
    concept = make_concept(tmp_path, n=2, class_dir=str(class_dir), num_class_images_per_image=1)
    settings = tiny_settings(steps_per_image=0, max_train_steps=3)
    with_prior = _losses(_train(sd1, tmp_path / "a", settings.replace(prior_mode="base_model"), concept=concept))
    assert "a photo of dog" in prompts
    assert not class_dir.exists() or not os.listdir(class_dir)            # no class images generated
    prompts.clear()
    without = _losses(_train(sd1, tmp_path / "b", settings,
                             concept=concept.replace(num_class_images_per_image=0)))
    assert "a photo of dog" not in prompts
    # step 1: the adapter is still a no-op, so the base model's prior term is 0 (and so is its gradient);
    # from step 2 the trained prediction moves away from the base one and the prior term adds to the loss
    assert with_prior[0] == pytest.approx(without[0], rel=1e-6)
    assert with_prior[1] > without[1] and with_prior[2] > without[2]


# ---- lengths -------------------------------------------------------------------------------------------------
def test_gradient_accumulation_makes_fewer_larger_steps(sd1, tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    forwards = []
    real_forward = UNet2DConditionModel.forward
    monkeypatch.setattr(UNet2DConditionModel, "forward",
                        lambda self, *a, **kw: forwards.append(1) or real_forward(self, *a, **kw))
    result = _train(sd1, tmp_path, tiny_settings(steps_per_image=2, gradient_accumulation_steps=2),
                    concept=make_concept(tmp_path, n=2))
    records = read_losses(result.run_dir)
    assert result.steps == 2 and [r["epoch"] for r in records] == [1, 2]
    assert len(forwards) == 4                                   # 2 micro-batches per optimizer step
    assert result.info["dataset_report"]["optimizer_steps_per_epoch"] == 1
    assert result.info["total_steps"] == 2


def test_max_train_steps_caps_the_run(sd1, tmp_path):
    result = _train(sd1, tmp_path, tiny_settings(steps_per_image=5, max_train_steps=3))
    assert result.steps == 3 and len(read_losses(result.run_dir)) == 3


@pytest.mark.slow
def test_pause_waits_between_epochs(sd1, tmp_path):
    from comfyui_dreambooth.training.control import TrainingControl
    from comfyui_dreambooth.training.trainer import TrainCallbacks

    concept = make_concept(tmp_path, n=1)                   # one step per epoch
    settings = tiny_settings(steps_per_image=3, pause_after_epochs=1, pause_seconds=0.5)
    result = _train(sd1, tmp_path, settings, concept=concept, callbacks=TrainCallbacks(control=TrainingControl()))
    times = [r["time"] for r in read_losses(result.run_dir)]
    assert len(times) == 3
    assert times[1] - times[0] >= 0.5 and times[2] - times[1] >= 0.5     # paused after epochs 1 and 2


def test_stop_request_cuts_a_pause_short(sd1, tmp_path):
    from comfyui_dreambooth.training.control import TrainingControl
    from comfyui_dreambooth.training.trainer import TrainCallbacks, TrainingInterrupted

    control = TrainingControl()
    concept = make_concept(tmp_path, n=1)
    settings = tiny_settings(steps_per_image=3, pause_after_epochs=1, pause_seconds=30.0)
    started = time.time()
    with pytest.raises(TrainingInterrupted) as e:
        _train(sd1, tmp_path, settings, concept=concept,
               callbacks=TrainCallbacks(control=control, progress=lambda p: control.request_stop(after_epoch=True)))
    assert time.time() - started < 20 and e.value.step == 1


# ---- checkpoints and previews ------------------------------------------------------------------------------------
def test_save_every_epochs_keeps_the_last_k_checkpoints(sd1, tmp_path):
    concept = make_concept(tmp_path, n=1)
    result = _train(sd1, tmp_path, tiny_settings(steps_per_image=5, save_every_epochs=1, keep_last_checkpoints=2),
                    concept=concept)
    ckpt_dir = os.path.join(result.run_dir, "checkpoints")
    assert sorted(os.listdir(ckpt_dir)) == ["step-0000003", "step-0000004"]
    assert os.path.exists(os.path.join(result.run_dir, "final", "trainable.safetensors"))


def test_save_every_two_epochs_keep_all(sd1, tmp_path):
    concept = make_concept(tmp_path, n=1)
    result = _train(sd1, tmp_path, tiny_settings(steps_per_image=5, save_every_epochs=2, keep_last_checkpoints=0),
                    concept=concept)
    assert sorted(os.listdir(os.path.join(result.run_dir, "checkpoints"))) == ["step-0000002", "step-0000004"]


def test_previews_every_epoch_are_saved_and_reported(sd1, tmp_path):
    from PIL import Image

    from comfyui_dreambooth.training.trainer import TrainCallbacks

    reported = []
    concept = make_concept(tmp_path, n=1, sample_prompt="a painting of sks dog")
    result = _train(sd1, tmp_path, tiny_settings(steps_per_image=2, preview_every_epochs=1, preview_steps=2,
                                                 preview_scheduler="euler"),
                    concept=concept, callbacks=TrainCallbacks(preview=reported.append))
    previews = os.path.join(result.run_dir, "previews")
    assert sorted(os.listdir(previews)) == ["epoch-00001_0.png", "epoch-00002_0.png"]
    assert reported == [[os.path.join(previews, "epoch-00001_0.png")], [os.path.join(previews, "epoch-00002_0.png")]]
    with Image.open(reported[0][0]) as im:
        assert im.size == (64, 64)


# ---- what trains ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_text_encoder_only(sd1, tmp_path, use_lora):
    result = _train(sd1, tmp_path, tiny_settings(use_lora=use_lora, train_unet=False, text_encoder_ratio=1.0,
                                                 steps_per_image=0, max_train_steps=2))
    assert module_hash(result.model.unet) == module_hash(sd1.unet)
    assert module_hash(result.model.text_encoders[0]) != module_hash(sd1.text_encoders[0])
    saved = load_tensors(os.path.join(result.run_dir, "final", "trainable.safetensors"))
    assert saved and all(k.startswith("te0.") for k in saved)


@pytest.mark.parametrize("lora_type", ["dora", "loha", "lokr"])
def test_other_adapter_types_train(sd1, tmp_path, lora_type):
    from comfyui_dreambooth.training.setup.adapters import adapter_config, adapted_layers
    from comfyui_dreambooth.training.setup.trainable import build_trainable, named_trainables

    settings = tiny_settings(lora_type=lora_type, steps_per_image=0, max_train_steps=2)
    result = _train(sd1, tmp_path, settings)
    assert adapter_config(result.model).lora_type == lora_type and adapted_layers(result.model.unet)
    losses = _losses(result)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    fresh, unet_params, te_params = build_trainable(sd1, settings.resolved([]))
    start = {k: p.detach() for k, p in named_trainables(fresh, unet_params, te_params).items()}
    final = load_tensors(os.path.join(result.run_dir, "final", "trainable.safetensors"))
    assert set(start) == set(final) and not same_tensors(start, final)


def test_lora_target_presets_are_applied(sd1, tmp_path):
    from comfyui_dreambooth.training.setup.adapters import adapted_layers

    result = _train(sd1, tmp_path, tiny_settings(lora_unet_targets="attention", lora_text_encoder_targets="attention",
                                                 text_encoder_ratio=1.0, steps_per_image=0, max_train_steps=1))
    unet_layers = list(adapted_layers(result.model.unet))
    te_layers = list(adapted_layers(result.model.text_encoders[0]))
    assert unet_layers and all(".attn" in name for name in unet_layers)
    assert te_layers and all("self_attn" in name for name in te_layers)


def test_base_model_prior_weights_each_example_by_its_own_concept(sd1):
    """A batch mixing two concepts weights each example's prior term by its own concept's prior_loss_weight."""
    from types import SimpleNamespace

    from comfyui_dreambooth.training.data.settings import ConceptSettings
    from comfyui_dreambooth.training.models.text import encode_prompts
    from comfyui_dreambooth.training.setup.adapters import add_adapters, adapter_parameters
    from comfyui_dreambooth.training.setup.noise import base_model_prior_loss, per_sample_mse

    tm = add_adapters(sd1, rank=2, on_unet=True, seed=0)
    with torch.no_grad():
        for p in adapter_parameters(tm):
            p.add_(0.05)                                   # the adapter now changes the prediction
    gen = torch.Generator().manual_seed(0)
    noisy, t = torch.randn(2, 4, 16, 16, generator=gen), torch.tensor([10, 500])
    batch = SimpleNamespace(concept_indices=[0, 1], time_ids=None)

    def loss(w0, w1):
        concepts = [ConceptSettings(class_prompt="a photo of dog", prior_loss_weight=w0),
                    ConceptSettings(class_prompt="a photo of cat", prior_loss_weight=w1)]
        with torch.no_grad():
            return float(base_model_prior_loss(tm, sd1, sd1.unet, tm.unet, concepts, batch, noisy, t,
                                                tiny_settings(prior_loss_weight=None), encode_prompts, per_sample_mse,
                                                with_grad=False))

    only_first, only_second, both = loss(1.0, 0.0), loss(0.0, 1.0), loss(1.0, 1.0)
    assert only_first > 0 and only_second > 0
    assert only_first + only_second == pytest.approx(both, rel=1e-5)
