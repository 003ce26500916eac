"""End-to-end training on the tiny models: the loss falls (sd1, LoRA and full fine-tune), SDXL and SD2-v runs,
and the received model is never modified (also when it was loaded as inference tensors, as in ComfyUI)."""
import pytest
import torch

from trainer_fixtures import make_concept, model_hash, module_hash, read_losses, tiny_settings


pytestmark = pytest.mark.usefixtures("single_thread")   # conftest: one torch thread, a fresh tiny sd1 per module


def _train(model, tmp_path, settings, concept=None, **kw):
    from comfyui_dreambooth.training.trainer import train

    concept = concept or make_concept(tmp_path)
    return train(model, [concept], settings, output_root=str(tmp_path / "out"), **kw)


def _mean(xs):
    return sum(xs) / len(xs)


@pytest.mark.slow
@pytest.mark.parametrize("use_lora, lr", [(True, 2e-2), (False, 1e-3)], ids=["lora", "full"])
def test_loss_falls_on_four_image_overfit_set(sd1, tmp_path, use_lora, lr):
    settings = tiny_settings(use_lora=use_lora, learning_rate=lr, steps_per_image=0, max_train_steps=16)
    result = _train(sd1, tmp_path, settings)
    losses = [r["loss"] for r in read_losses(result.run_dir)]
    assert len(losses) == 16 and result.steps == 16
    first, last = _mean(losses[:4]), _mean(losses[-4:])
    assert last < 0.8 * first, (first, last, losses)
    assert result.final_loss == losses[-1]
    # the returned model really carries the training: its UNet differs from the base
    assert module_hash(result.model.unet) != module_hash(sd1.unet)
    assert (result.model.metadata.get("adapter") is not None) == use_lora


def test_sdxl_lora_with_text_encoders(tmp_path):
    """SDXL: both text encoders (pooled output from the second), size/crop time ids from the bucket."""
    from comfyui_dreambooth.training.models import build_tiny_model

    model = build_tiny_model("sdxl")
    calls = []
    unet_forward = type(model.unet).forward

    def spy(self, sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=None, **kw):
        calls.append((encoder_hidden_states.shape, {k: v.shape for k, v in (added_cond_kwargs or {}).items()},
                      added_cond_kwargs["time_ids"].clone()))
        return unet_forward(self, sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=added_cond_kwargs,
                            **kw)

    before = model_hash(model)
    settings = tiny_settings(text_encoder_ratio=1.0, steps_per_image=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(model.unet), "forward", spy)
        result = _train(model, tmp_path, settings)
    assert model_hash(model) == before
    assert result.steps == 4 and all(r["loss"] == r["loss"] for r in read_losses(result.run_dir))
    emb_shape, added, time_ids = calls[0]
    assert emb_shape[-1] == 64                       # 32 (CLIP-L-like) + 32 (bigG-like) concatenated
    assert added == {"text_embeds": torch.Size([1, 32]), "time_ids": torch.Size([1, 6])}
    assert time_ids.tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]   # original hw, crop top-left, target hw
    # both text encoders got adapters and trained
    for base_te, te in zip(model.text_encoders, result.model.text_encoders):
        trained = {k: v for k, v in te.state_dict().items() if "lora_B" in k}
        assert trained and any(v.abs().sum() > 0 for v in trained.values())
        assert te is not base_te


def test_sd2_v_prediction_with_zero_terminal_snr(tmp_path, monkeypatch):
    from comfyui_dreambooth.training.models import build_tiny_model
    from comfyui_dreambooth.training.setup import noise

    model = build_tiny_model("sd2")
    assert model.prediction_type == "v_prediction"
    seen = {}
    real_target, real_build = noise.training_target, noise.build_noise_scheduler

    def target_spy(scheduler, latents, noise_, t, prediction_type):
        seen.setdefault("prediction_types", set()).add(prediction_type)
        out = real_target(scheduler, latents, noise_, t, prediction_type)
        seen["equals_noise"] = torch.equal(out, noise_)
        return out

    def build_spy(settings, prediction_type, **kwargs):
        seen["scheduler"] = real_build(settings, prediction_type, **kwargs)
        return seen["scheduler"]

    monkeypatch.setattr(noise, "training_target", target_spy)
    monkeypatch.setattr(noise, "build_noise_scheduler", build_spy)
    result = _train(model, tmp_path, tiny_settings(steps_per_image=1, zero_terminal_snr=True, min_snr_gamma=5.0))
    assert result.steps == 4
    assert seen["prediction_types"] == {"v_prediction"} and not seen["equals_noise"]
    assert seen["scheduler"].alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-12)   # zero terminal SNR
    assert all(0 < r["loss"] < 10 for r in read_losses(result.run_dir))
    assert result.model.prediction_type == "v_prediction"


def _settings_touching_everything(**changes):
    return tiny_settings(text_encoder_ratio=0.5, use_ema=True, ema_decay=0.9, steps_per_image=0, max_train_steps=2,
                         **changes)


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_received_model_is_not_modified(sd1, tmp_path, use_lora):
    before = model_hash(sd1)
    result = _train(sd1, tmp_path, _settings_touching_everything(use_lora=use_lora))
    assert model_hash(sd1) == before
    assert result.model is not sd1 and result.model.unet is not sd1.unet
    assert module_hash(result.model.text_encoders[0]) != module_hash(sd1.text_encoders[0])


def test_fp16_vae_of_received_model_keeps_its_dtype(tmp_path):
    """The VAE runs in fp32 for training/previews, but the received model's (fp16) VAE is not converted."""
    from comfyui_dreambooth.training.models import build_tiny_model

    model = build_tiny_model("sd1")
    model.vae.to(torch.float16)
    before = model_hash(model)
    result = _train(model, tmp_path, tiny_settings(steps_per_image=0, max_train_steps=1))
    assert model.vae.dtype == torch.float16 and model_hash(model) == before
    assert result.model.vae.dtype == torch.float32


@pytest.mark.parametrize("settings_kw", [
    dict(use_lora=True, text_encoder_ratio=0.5),
    dict(use_lora=False, text_encoder_ratio=0.5, use_ema=True, ema_decay=0.9),
    dict(use_lora=False, train_unet=False, text_encoder_ratio=1.0),
    dict(use_lora=True, train_unet=False, text_encoder_ratio=1.0),
], ids=["lora", "full", "full-te-only", "lora-te-only"])
def test_trains_under_inference_mode_like_comfyui(tmp_path, settings_kw):
    """ComfyUI runs nodes under torch.inference_mode() and its loaders make inference tensors."""
    from comfyui_dreambooth.training.models import build_tiny_model
    from comfyui_dreambooth.training.trainer import train

    with torch.inference_mode():
        model = build_tiny_model("sd1")
        assert model.unet.conv_in.weight.is_inference()
        before = model_hash(model)
        result = train(model, [make_concept(tmp_path, n=2)], tiny_settings(steps_per_image=1, **settings_kw),
                       output_root=str(tmp_path / "out"))
        assert model_hash(model) == before
    losses = read_losses(result.run_dir)
    assert len(losses) == 2 and all(0 < r["loss"] < 10 for r in losses)
    assert module_hash(result.model.text_encoders[0]) != module_hash(model.text_encoders[0])

