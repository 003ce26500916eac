"""Noise / loss helpers: each effect (offset noise, zero terminal SNR, v target, Min-SNR) and a tiny-UNet step
that composes them with the optimizer, LR schedule and EMA."""
import pytest
import torch

from comfyui_dreambooth.training.models.components import SD_NOISE_SCHEDULE
from comfyui_dreambooth.training.settings import DreamBoothSettings
from comfyui_dreambooth.training.setup.noise import (
    build_noise_scheduler, compute_snr, min_snr_weights, per_sample_mse, rescale_zero_terminal_snr,
    sample_noise, sample_timesteps, training_target, weighted_mean_loss)

S = DreamBoothSettings()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_offset_noise_shifts_the_mean_per_channel():
    latents = torch.zeros(64, 4, 32, 32)
    plain = sample_noise(latents, 0.0, gen())
    offset = sample_noise(latents, 0.5, gen())
    plain_means, offset_means = plain.mean(dim=(2, 3)), offset.mean(dim=(2, 3))
    # plain noise: channel means ~ N(0, 1/1024); offset noise adds 0.5 * N(0, 1) per (sample, channel)
    assert plain_means.std() < 0.06
    assert 0.35 < offset_means.std() < 0.65
    # the offset is constant over the image: removing each channel's mean leaves noise of the plain kind
    centred = offset - offset_means[..., None, None]
    assert abs(centred.std().item() - 1.0) < 0.02
    assert plain.shape == latents.shape and plain.dtype == latents.dtype


def test_noise_is_reproducible_and_follows_the_latents_dtype():
    latents = torch.zeros(2, 4, 8, 8, dtype=torch.bfloat16)
    a, b = sample_noise(latents, 0.1, gen(5)), sample_noise(latents, 0.1, gen(5))
    assert torch.equal(a, b) and a.dtype == torch.bfloat16
    assert not torch.equal(a, sample_noise(latents, 0.1, gen(6)))


def test_timesteps():
    sched = build_noise_scheduler(S, "epsilon")
    t = sample_timesteps(sched, 5000, gen(1))
    assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 999 and t.max() > 990 and t.min() < 10
    assert torch.equal(t, sample_timesteps(sched, 5000, gen(1)))


def test_noise_scheduler_is_the_sd_schedule():
    sched = build_noise_scheduler(S, "epsilon")
    for key, value in SD_NOISE_SCHEDULE.items():
        assert sched.config[key] == value
    assert sched.config.prediction_type == "epsilon"
    assert build_noise_scheduler(S, "v_prediction").config.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="noise_scheduler"):
        build_noise_scheduler(S.replace(noise_scheduler="DEIS"), "epsilon")
    with pytest.raises(ValueError, match="prediction_type"):
        build_noise_scheduler(S, "sample")


def test_zero_terminal_snr():
    plain = build_noise_scheduler(S, "v_prediction")
    zero = build_noise_scheduler(S.replace(zero_terminal_snr=True), "v_prediction")
    t = torch.tensor([0, 500, 999])
    snr_plain, snr_zero = compute_snr(plain, t), compute_snr(zero, t)
    assert snr_plain[-1] > 0 and snr_zero[-1] == 0                       # last step: pure noise
    torch.testing.assert_close(snr_zero[0], snr_plain[0])               # first step unchanged
    assert snr_zero[1] < snr_plain[1]
    torch.testing.assert_close(rescale_zero_terminal_snr(plain.betas), zero.betas)
    # Min-SNR stays finite at SNR 0 for both prediction types
    assert torch.isfinite(min_snr_weights(zero, t, 5.0, "v_prediction")).all()
    assert torch.isfinite(min_snr_weights(zero, t, 5.0, "epsilon")).all()
    with pytest.raises(ValueError, match="v-prediction"):
        build_noise_scheduler(S.replace(zero_terminal_snr=True), "epsilon")


def test_training_targets():
    sched = build_noise_scheduler(S, "v_prediction")
    latents, noise = torch.randn(3, 4, 8, 8, generator=gen(1)), torch.randn(3, 4, 8, 8, generator=gen(2))
    t = torch.tensor([10, 400, 900])
    assert training_target(sched, latents, noise, t, "epsilon") is noise
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(training_target(sched, latents, noise, t, "v_prediction"),
                               a.sqrt() * noise - (1 - a).sqrt() * latents)
    with pytest.raises(ValueError):
        training_target(sched, latents, noise, t, "x0")


def test_snr_and_min_snr_weights():
    sched = build_noise_scheduler(S, "epsilon")
    t = torch.tensor([0, 50, 200, 600, 999])
    a = sched.alphas_cumprod[t]
    snr = compute_snr(sched, t)
    torch.testing.assert_close(snr, a / (1 - a))
    gamma = 5.0
    eps = min_snr_weights(sched, t, gamma, "epsilon")
    v = min_snr_weights(sched, t, gamma, "v_prediction")
    torch.testing.assert_close(eps, torch.clamp(snr, max=gamma) / snr)
    torch.testing.assert_close(v, torch.clamp(snr, max=gamma) / (snr + 1))
    assert eps[0] < 0.01 and eps[-1] == 1.0              # low-noise steps weighted down, noisy ones kept
    assert torch.equal(min_snr_weights(sched, t, 0.0, "epsilon"), torch.ones(5))
    with pytest.raises(ValueError):
        min_snr_weights(sched, t, gamma, "x0")


def test_losses():
    pred = torch.zeros(2, 4, 2, 2, dtype=torch.float16)
    target = torch.stack([torch.ones(4, 2, 2), 2 * torch.ones(4, 2, 2)]).half()
    per = per_sample_mse(pred, target)
    assert per.dtype == torch.float32 and per.tolist() == [1.0, 4.0]
    assert weighted_mean_loss(per).item() == 2.5
    # e.g. an instance sample (weight 1) and a prior sample with prior_loss_weight 0.5
    assert weighted_mean_loss(per, torch.tensor([1.0, 0.5])).item() == 1.5


def test_a_tiny_unet_learns_with_the_setup_pieces(single_thread):
    """Noise -> target -> weighted loss -> optimizer -> LR schedule -> EMA on the tiny SD1 UNet (v-prediction,
    zero-terminal-SNR, offset noise, Min-SNR all on): the loss on a fixed batch falls."""
    from comfyui_dreambooth.training.models.tiny import build_tiny_model
    from comfyui_dreambooth.training.setup.ema import EMA
    from comfyui_dreambooth.training.setup.optimizers import build_optimizer, training_param_groups
    from comfyui_dreambooth.training.setup.schedulers import build_lr_scheduler

    s = DreamBoothSettings(learning_rate=3e-3, lr_scheduler="cosine", lr_warmup_steps=2, lr_min=3e-4,
                           offset_noise=0.05, min_snr_gamma=5.0, zero_terminal_snr=True, use_ema=True,
                           ema_decay=0.9, steps_per_image=1, text_encoder_ratio=0.0)
    model = build_tiny_model("sd1", prediction_type="v_prediction")
    unet = model.unet.requires_grad_(True).train()
    sched = build_noise_scheduler(s, model.prediction_type)
    opt = build_optimizer(training_param_groups(unet.parameters(), [], s), s)
    total = 30
    lr_sched = build_lr_scheduler(opt, s, total)
    ema = EMA(unet, s.ema_decay)
    latents = torch.randn(2, 4, 8, 8, generator=gen(3))
    embeds = torch.randn(2, 77, 32, generator=gen(4))
    fixed_t = torch.tensor([300, 700])

    def eval_loss():
        with torch.no_grad():
            noise = sample_noise(latents, 0.0, gen(9))
            pred = unet(sched.add_noise(latents, noise, fixed_t), fixed_t, embeds).sample
            return per_sample_mse(pred, training_target(sched, latents, noise, fixed_t, "v_prediction")).mean()

    g = gen(0)
    start = eval_loss()
    _train(total, s, unet, sched, opt, lr_sched, ema, latents, embeds, g, model.prediction_type)
    assert eval_loss() < 0.8 * start
    assert opt.param_groups[0]["lr"] == pytest.approx(3e-4)      # schedule reached its floor
    name, param = next(iter(unet.named_parameters()))
    assert not torch.equal(ema.shadow[name], param.detach())


def _train(total, s, unet, sched, opt, lr_sched, ema, latents, embeds, g, prediction_type):
    for _ in range(total):
        noise = sample_noise(latents, s.offset_noise, g)
        t = sample_timesteps(sched, latents.shape[0], g)
        pred = unet(sched.add_noise(latents, noise, t), t, embeds).sample
        target = training_target(sched, latents, noise, t, prediction_type)
        loss = weighted_mean_loss(per_sample_mse(pred, target),
                                  min_snr_weights(sched, t, s.min_snr_gamma, prediction_type))
        assert torch.isfinite(loss)
        opt.zero_grad(set_to_none=s.set_grads_to_none)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), s.max_grad_norm)
        opt.step()
        lr_sched.step()
        ema.step(unet)
