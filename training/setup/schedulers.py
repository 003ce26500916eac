"""Learning-rate schedules: one pure function of the step (`lr_multiplier`) behind a torch LambdaLR.

With w = lr_warmup_steps (schedules with a warm-up only), T = total optimizer steps, s = step (0-based, the
optimizer step about to be taken), p = clamp((s - w) / max(1, T - w), 0, 1), floor m = lr_min / learning_rate:

    warm-up (s < w)          s / w                              (0 at the first step, as diffusers)
    constant[_with_warmup]   1
    linear[_with_warmup]     m + (1 - m) * (1 - p)
    cosine                   m + (1 - m) * 0.5 * (1 + cos(pi * p))
    cosine_with_restarts     m + (1 - m) * 0.5 * (1 + cos(pi * ((lr_cycles * p) mod 1)))   (m once p = 1)
    polynomial               m + (1 - m) * (1 - p) ** lr_power

The multiplier scales every parameter group's own rate, so the UNet ends at lr_min and the text encoder at
lr_min * text_encoder_lr / learning_rate. With lr_min = 0 these equal diffusers.optimization's schedules.
"""
from __future__ import annotations

import math

from ..settings import LR_SCHEDULERS, WARMUP_SCHEDULERS


def warmup_steps(settings) -> int:
    return settings.lr_warmup_steps if settings.lr_scheduler in WARMUP_SCHEDULERS else 0


def lr_multiplier(step: int, settings, total_steps: int) -> float:
    """Factor applied to each group's base learning rate at optimizer step `step`."""
    name = settings.lr_scheduler
    if name not in LR_SCHEDULERS:
        raise ValueError(f"lr_scheduler = {name!r} is not known; use one of: {', '.join(LR_SCHEDULERS)}")
    warmup = warmup_steps(settings)
    if step < warmup:
        return step / warmup
    if name in ("constant", "constant_with_warmup"):
        return 1.0
    progress = min(1.0, max(0.0, (step - warmup) / max(1, total_steps - warmup)))
    if name in ("linear", "linear_with_warmup"):
        decay = 1.0 - progress
    elif name == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif name == "cosine_with_restarts":
        decay = 0.0 if progress >= 1.0 else 0.5 * (1.0 + math.cos(math.pi * ((settings.lr_cycles * progress) % 1.0)))
    else:  # polynomial
        decay = (1.0 - progress) ** settings.lr_power
    floor = settings.lr_min / settings.unet_lr if settings.lr_min else 0.0
    return floor + (1.0 - floor) * decay


def lr_at(step: int, settings, total_steps: int, base_lr: float | None = None) -> float:
    """The learning rate at `step` for a group whose base rate is `base_lr` (default: settings' UNet rate)."""
    base = settings.unet_lr if base_lr is None else base_lr
    return base * lr_multiplier(step, settings, total_steps)


def build_lr_scheduler(optimizer, settings, total_steps: int):
    """A LambdaLR following `lr_multiplier`. Call `.step()` after each optimizer step; its state_dict holds the
    step count, so a resumed run continues the same curve."""
    from torch.optim.lr_scheduler import LambdaLR

    if total_steps < 1:
        raise ValueError(f"total_steps = {total_steps}; a schedule needs at least one step")
    lr_multiplier(0, settings, total_steps)  # fail now, not at the first step, on an unknown name
    return LambdaLR(optimizer, lambda step: lr_multiplier(step, settings, total_steps))


__all__ = ["build_lr_scheduler", "lr_at", "lr_multiplier", "warmup_steps"]
