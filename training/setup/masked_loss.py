"""Masked loss (settings masked_loss, unmasked_weight, normalize_masked_area): the per-sample MSE weighted by each
example's latent-size mask (data/masks.py), as OneTrainer computes it.

A pixel's weight is max(mask, unmasked_weight): the subject (white) counts fully, the background (black) by
unmasked_weight. With normalize_masked_area each example's loss is divided by its mean weight, so an example
whose subject fills a tenth of the image still contributes a full-size loss. A mask of all ones weights every
pixel by exactly 1 and divides by exactly 1: the same numbers, bit for bit, as training without a mask.
"""
from __future__ import annotations

from . import noise   # looked up at call time: a patched noise.per_sample_mse (the NaN tests) is the one used


def per_sample_loss(pred, target, masks, settings):
    """Per-sample loss (shape (B,), float32): `per_sample_mse`, weighted by `masks` ((B, 1, h, w) or None) when
    `settings.masked_loss` is on."""
    if masks is None or not settings.masked_loss:
        return noise.per_sample_mse(pred, target)
    weight = masks.to(pred.device).float()
    weight = weight.clamp(min=settings.unmasked_weight, max=1.0)
    diff = pred.float() - target.float()
    loss = (diff.pow(2) * weight).flatten(1).mean(dim=1)
    if settings.normalize_masked_area:
        # the weight's mean over every value of the prediction (channels broadcast): all ones -> exactly 1
        area = weight.expand_as(diff).flatten(1).mean(dim=1)
        loss = loss / area.clamp(min=1e-6)
    return loss


__all__ = ["per_sample_loss"]
