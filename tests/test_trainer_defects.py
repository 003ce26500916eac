"""Training-math defects found by review (issue 9, point 4): each test failed before its fix."""
import os

import pytest
import torch

from trainer_fixtures import load_tensors, make_concept, make_images, module_hash, read_losses, tiny_settings

pytestmark = pytest.mark.usefixtures("single_thread")


def _train(model, tmp_path, settings, concept=None, **kw):
    from comfyui_dreambooth.training.trainer import train

    concept = concept or make_concept(tmp_path)
    return train(model, [concept], settings, output_root=str(tmp_path / "out"), **kw)


# ---- a. train_unet = False with a text-encoder ratio ----------------------------------------------------------------
@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_text_encoder_only_run_ends_when_the_text_encoder_freezes(sd1, tmp_path, use_lora):
    logs = []
    from comfyui_dreambooth.training.trainer import TrainCallbacks

    result = _train(sd1, tmp_path, tiny_settings(use_lora=use_lora, train_unet=False, text_encoder_ratio=0.5,
                                                 steps_per_image=0, max_train_steps=4),
                    callbacks=TrainCallbacks(log=logs.append))
    assert result.steps == 2
    assert [r["step"] for r in read_losses(result.run_dir)] == [1, 2]
    assert module_hash(result.model.unet) == module_hash(sd1.unet) or use_lora
    assert any("train_unet" in line and "text encoder" in line for line in logs), logs
    state = load_tensors(os.path.join(result.run_dir, "final", "trainable.safetensors"))
    assert state and all(k.startswith("te0.") for k in state)


def test_text_encoder_only_run_with_no_text_encoder_steps_is_refused_up_front(sd1, tmp_path):
    from comfyui_dreambooth.training.settings import SettingsError

    with pytest.raises(SettingsError) as err:
        _train(sd1, tmp_path, tiny_settings(use_lora=False, train_unet=False, text_encoder_ratio=0.1,
                                            steps_per_image=0, max_train_steps=4))
    msg = str(err.value)
    assert "train_unet" in msg and "text_encoder_ratio" in msg
    runs = os.path.join(tmp_path, "out", "dreambooth")
    assert not any(n.startswith("run") for n in os.listdir(runs)) if os.path.isdir(runs) else True


# ---- b. zero terminal SNR is part of the result, and a ZTSNR base trains with its schedule -------------------------
def _v_model(model, ztsnr=False):
    return model.replace(prediction_type="v_prediction", zero_terminal_snr=ztsnr)


def test_zero_terminal_snr_setting_is_recorded_on_the_trained_model(sd1, tmp_path):
    result = _train(_v_model(sd1), tmp_path, tiny_settings(zero_terminal_snr=True, steps_per_image=1))
    assert result.model.zero_terminal_snr is True
    assert result.model.prediction_type == "v_prediction"


def test_a_zero_terminal_snr_base_model_trains_with_its_schedule(sd1, tmp_path, monkeypatch):
    from comfyui_dreambooth.training.setup import noise

    made = []
    real = noise.build_noise_scheduler

    def spy(*args, **kwargs):
        sched = real(*args, **kwargs)
        made.append(sched)
        return sched

    monkeypatch.setattr(noise, "build_noise_scheduler", spy)
    result = _train(_v_model(sd1, ztsnr=True), tmp_path, tiny_settings(zero_terminal_snr=False, steps_per_image=1))
    assert made and all(s.config.rescale_betas_zero_snr for s in made)
    assert float(made[0].alphas_cumprod[-1]) < 1e-6            # the last timestep is pure noise
    assert result.model.zero_terminal_snr is True


# ---- c. prior_mode = base_model never trains on class images left in class_dir --------------------------------------
@pytest.mark.slow
def test_base_model_prior_ignores_class_images_present(sd1, tmp_path):
    class_dir = make_images(str(tmp_path / "class"), 4, seed=5)
    concept = make_concept(tmp_path, class_dir=class_dir, num_class_images_per_image=1)
    result = _train(sd1, tmp_path, tiny_settings(prior_mode="base_model", steps_per_image=1), concept=concept)
    assert result.steps == 4                                   # the 4 instance images, no class examples
    report = result.info["dataset_report"]
    assert report["examples_per_epoch"] == 4


# ---- e. full fine-tune of a half-precision model trains fp32 master weights -----------------------------------------
def test_full_finetune_of_a_bf16_model_keeps_small_updates(sd1, tmp_path):
    half = sd1.replace(unet=_copy_as(sd1.unet, torch.bfloat16),
                       text_encoders=[_copy_as(te, torch.bfloat16) for te in sd1.text_encoders])
    result = _train(half, tmp_path, tiny_settings(use_lora=False, learning_rate=1e-6, optimizer="AdamW",
                                                  steps_per_image=0, max_train_steps=2, max_grad_norm=0.0))
    trained = result.model.unet
    assert all(p.dtype == torch.float32 for p in trained.parameters())
    base = dict(half.unet.named_parameters())
    moved = changed = 0
    for name, p in trained.named_parameters():
        b = base[name].float()
        moved += p.numel()
        changed += int((p.detach() != b).sum())
    assert changed / moved > 0.9, f"only {changed}/{moved} weights moved"
    assert all(p.dtype == torch.bfloat16 for p in half.unet.parameters())     # the received model is untouched


def _copy_as(module, dtype):
    import copy

    return copy.deepcopy(module).to(dtype)


# ---- f. the fp16 GradScaler state is part of a checkpoint ----------------------------------------------------------
def test_grad_scaler_state_is_saved_and_restored(tmp_path):
    from comfyui_dreambooth.training import checkpoints

    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    scaler._lazy_init_scale_growth_tracker(torch.device("cpu"))
    scaler.update(512.0)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    checkpoints.write_state(str(folder), {"p": p}, opt, sched, None, {"step": 3, "run_id": "r"}, scaler=scaler)
    fresh = torch.amp.GradScaler("cpu", init_scale=65536.0, growth_interval=2000)
    step = checkpoints.load_checkpoint(str(folder), {"p": p}, opt, sched, None, "r", scaler=fresh)
    assert step == 3
    assert fresh.get_scale() == 512.0
    assert fresh.get_growth_interval() == 7


# ---- g. vae_dtype decides the VAE that encodes the training latents -------------------------------------------------
@pytest.mark.parametrize("vae_dtype,mp,expected", [("fp32", "bf16", torch.float32), ("bf16", "bf16", torch.bfloat16)])
def test_vae_dtype_is_the_dtype_latents_are_encoded_with(sd1, tmp_path, monkeypatch, vae_dtype, mp, expected):
    from comfyui_dreambooth.training.data import prepare

    seen = []
    real = prepare.prepare_training_data

    def spy(model, *args, **kwargs):
        seen.append(model.vae.dtype)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(prepare, "prepare_training_data", spy)
    start = sd1.replace(vae=_copy_as(sd1.vae, torch.bfloat16)) if expected == torch.float32 else sd1
    _train(start, tmp_path, tiny_settings(vae_dtype=vae_dtype, mixed_precision=mp, steps_per_image=1))
    assert seen == [expected]
    assert start.vae.dtype == (torch.bfloat16 if expected == torch.float32 else torch.float32)   # untouched


# ---- h. class images are generated with the run's clip_skip ---------------------------------------------------------
@pytest.mark.slow
def test_class_images_use_the_runs_clip_skip(sd1, tmp_path, monkeypatch):
    from comfyui_dreambooth.training import sampling

    calls = []
    real = sampling.generate

    def spy(model, prompts, **kwargs):
        calls.append(kwargs.get("clip_skip"))
        return real(model, prompts, **kwargs)

    monkeypatch.setattr(sampling, "generate", spy)
    concept = make_concept(tmp_path, class_dir=str(tmp_path / "class"), num_class_images_per_image=1, class_steps=1)
    _train(sd1, tmp_path, tiny_settings(clip_skip=2, steps_per_image=1), concept=concept)
    assert calls and set(calls) == {2}


# ---- i. a warm-up longer than the run is refused before training ----------------------------------------------------
def test_warmup_longer_than_the_run_is_refused(sd1, tmp_path):
    from comfyui_dreambooth.training.settings import SettingsError

    with pytest.raises(SettingsError) as err:
        _train(sd1, tmp_path, tiny_settings(lr_scheduler="constant_with_warmup", lr_warmup_steps=50,
                                            steps_per_image=0, max_train_steps=4))
    assert "lr_warmup_steps = 50" in str(err.value) and "4 steps" in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_a_bf16_model_trains_with_mixed_precision_off(sd1, tmp_path, use_lora):
    """mixed_precision 'no' with a model loaded in bf16: computed in bf16 autocast (said so), not a dtype error."""
    from comfyui_dreambooth.training.trainer import TrainCallbacks

    half = sd1.replace(unet=_copy_as(sd1.unet, torch.bfloat16),
                       text_encoders=[_copy_as(te, torch.bfloat16) for te in sd1.text_encoders])
    logs = []
    result = _train(half, tmp_path, tiny_settings(use_lora=use_lora, mixed_precision="no", steps_per_image=1),
                    callbacks=TrainCallbacks(log=logs.append))
    assert result.steps == 4
    assert any("loaded in bf16" in line for line in logs), logs
    # the result samples (fp32 trained weights beside bf16 frozen ones: the training autocast stays with them)
    from comfyui_dreambooth.training.sampling import generate

    images = generate(result.model, "a photo of sks dog", steps=2, width=64, height=64)
    assert images.shape == (1, 64, 64, 3) and torch.isfinite(images).all()
