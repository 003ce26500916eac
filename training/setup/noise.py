"""Noise, timesteps, targets and loss weights for one diffusion training step, as small composable functions.

A training step reads (the trainer owns the loop):

    noise = sample_noise(latents, settings.offset_noise, generator)
    t = sample_timesteps(scheduler, latents.shape[0], generator, latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    pred = unet(noisy, t, embeds).sample
    target = training_target(scheduler, latents, noise, t, prediction_type)
    weights = min_snr_weights(scheduler, t, settings.min_snr_gamma, prediction_type) * prior_weights
    loss = weighted_mean_loss(per_sample_mse(pred, target), weights)

Random draws take a torch.Generator; they are made on the generator's device and moved to the latents', so a
CPU generator gives the same noise whatever device trains (resume and CPU/GPU comparisons stay exact).
"""
from __future__ import annotations

import contextlib
import hashlib

from ..models.components import PREDICTION_TYPES, SD_NOISE_SCHEDULE
from .trainable import adapters_disabled


def _draw_device(generator, fallback):
    return generator.device if generator is not None else fallback


def sample_noise(latents, offset_noise: float = 0.0, generator=None):
    """Gaussian noise like `latents`, plus offset noise: offset_noise * N(0, 1) per (sample, channel), constant
    over the image, so the model also learns to change an image's overall brightness / colour."""
    import torch

    device = _draw_device(generator, latents.device)
    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=torch.float32)
    if offset_noise:
        b, c = latents.shape[:2]
        offset = torch.randn((b, c) + (1,) * (latents.dim() - 2), generator=generator, device=device,
                             dtype=torch.float32)
        noise = noise + offset_noise * offset
    return noise.to(device=latents.device, dtype=latents.dtype)


def sample_timesteps(scheduler, batch_size: int, generator=None, device=None):
    """Uniform integer timesteps in [0, num_train_timesteps), one per sample (long tensor on `device`)."""
    import torch

    n = scheduler.config.num_train_timesteps
    t = torch.randint(0, n, (batch_size,), generator=generator, device=_draw_device(generator, device or "cpu"))
    return t.to(device=device or t.device, dtype=torch.long)


def rescale_zero_terminal_snr(betas):
    """Betas rescaled so the last timestep has SNR 0 (pure noise), the first keeps its value
    (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1)."""
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as _rescale

    return _rescale(betas)


def build_noise_scheduler(settings, prediction_type: str, zero_terminal_snr: bool | None = None):
    """The DDPM training schedule SD was trained with (SD_NOISE_SCHEDULE), for the model's prediction type;
    rescaled to zero terminal SNR when `zero_terminal_snr` (default: settings.zero_terminal_snr; the trainer also
    turns it on for a base model that is already ZTSNR). v-prediction models only."""
    from diffusers import DDPMScheduler

    if settings.noise_scheduler != "DDPM":
        raise ValueError(f"noise_scheduler = {settings.noise_scheduler!r} is not supported; use 'DDPM'")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type = {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")
    if zero_terminal_snr is None:
        zero_terminal_snr = settings.zero_terminal_snr
    if zero_terminal_snr and prediction_type != "v_prediction":
        raise ValueError("zero_terminal_snr = True needs a v-prediction model: at zero SNR an epsilon model sees "
                         "pure noise and cannot predict the image; turn zero_terminal_snr off, or load the model "
                         "with prediction_type 'v_prediction' (SD2-768 style models)")
    return DDPMScheduler(**SD_NOISE_SCHEDULE, prediction_type=prediction_type,
                         rescale_betas_zero_snr=bool(zero_terminal_snr))


def training_target(scheduler, latents, noise, timesteps, prediction_type: str):
    """What the UNet must predict: the noise (epsilon) or the velocity sqrt(a)*noise - sqrt(1-a)*latents (v)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction_type = {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")


def compute_snr(scheduler, timesteps):
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep (float32, on timesteps' device)."""
    import torch

    a = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return a / (1.0 - a)


def min_snr_weights(scheduler, timesteps, gamma: float, prediction_type: str):
    """Per-sample loss weights of Min-SNR-gamma (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon,
    min(SNR, gamma) / (SNR + 1) for v-prediction. gamma <= 0: all ones (off)."""
    import torch

    if gamma <= 0:
        return torch.ones(timesteps.shape, device=timesteps.device, dtype=torch.float32)
    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        # min(snr, g) / snr -> 1 as snr -> 0 (only reached with a zero-terminal-SNR schedule)
        return torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    raise ValueError(f"prediction_type = {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")


def per_sample_mse(pred, target):
    """Mean squared error per sample, computed in float32 (shape (B,))."""
    diff = pred.float() - target.float()
    return diff.pow(2).flatten(1).mean(dim=1)


def weighted_mean_loss(per_sample, weights=None):
    """Mean over the batch of weight * loss. Weights combine per-sample factors: Min-SNR, and the prior loss
    weight on prior-preservation samples (1 on instance samples), so every sample counts once in the mean."""
    if weights is None:
        return per_sample.mean()
    return (per_sample * weights.to(per_sample.device, per_sample.dtype)).mean()


# ---- seeds: every random draw of step s comes from generators seeded by (seed, s) --------------------------
def step_seed(seed: int, step: int, micro: int = 0) -> int:
    digest = hashlib.sha256(f"{seed}:{step}:{micro}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seed_global_rng(seed: int, device) -> None:
    """Seed the global generators a step may draw from: the CPU's and the training device's.
    (torch.manual_seed also walks every other backend: 0.7 ms a step on a CPU-only build.)"""
    import torch

    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)
    elif device.type != "cpu":
        torch.manual_seed(seed)


def example_generators(seed: int, step: int, items) -> list:
    """One CPU generator per example of a batch, seeded by (seed, step, dataset index, repeat within the batch)."""
    import torch

    seen: dict[int, int] = {}
    gens = []
    for index in items:
        seen[index] = seen.get(index, -1) + 1
        digest = hashlib.sha256(f"{seed}:{step}:{index}:{seen[index]}".encode()).digest()
        gens.append(torch.Generator("cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1)))
    return gens


def base_model_prior_loss(tm, base_model, base_unet, unet_fwd, concepts, batch, noisy, t, settings,
                          encode_prompts, per_sample_mse, with_grad):
    """Prior preservation without class images: on the same noisy latents, the trained model's prediction
    for the class prompt is pulled toward the frozen base model's prediction for it."""
    import torch

    prompts = [concepts[ci].class_prompt for ci in batch.concept_indices]
    keep = [i for i, p in enumerate(prompts) if p]
    if not keep:
        return torch.zeros((), device=noisy.device)
    prompts = [prompts[i] for i in keep]
    noisy, t = noisy[keep], t[keep]
    time_ids = batch.time_ids[keep] if batch.time_ids is not None else None
    clip_skip = settings.clip_skip_or_none
    with torch.no_grad():
        base_te = encode_prompts(base_model, prompts, clip_skip)
        added = {"text_embeds": base_te.pooled, "time_ids": time_ids} if tm.is_sdxl else None
        if tm.unet is base_unet or settings.use_lora:
            with adapters_disabled(tm.unet):
                target = tm.unet(noisy, t, base_te.embeds, added_cond_kwargs=added).sample
        else:
            target = base_unet(noisy, t, base_te.embeds.to(base_unet.dtype), added_cond_kwargs=added).sample
    ctx = contextlib.nullcontext() if with_grad else torch.no_grad()
    with ctx:
        te = encode_prompts(tm, prompts, clip_skip)
    added = {"text_embeds": te.pooled, "time_ids": time_ids} if tm.is_sdxl else None
    pred = unet_fwd(noisy, t, te.embeds, added_cond_kwargs=added).sample
    # each example's own concept weight (a batch may mix concepts), unless the settings override them all
    weights = torch.tensor([settings.prior_loss_weight if settings.prior_loss_weight is not None
                            else concepts[batch.concept_indices[i]].prior_loss_weight for i in keep],
                           device=pred.device, dtype=torch.float32)
    return (per_sample_mse(pred, target.detach()) * weights).mean()


__all__ = ["sample_noise", "sample_timesteps", "rescale_zero_terminal_snr", "build_noise_scheduler",
           "training_target", "compute_snr", "min_snr_weights", "per_sample_mse", "weighted_mean_loss", "step_seed",
           "seed_global_rng", "example_generators", "base_model_prior_loss"]
