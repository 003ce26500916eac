"""Resolution: aspect-ratio buckets, or one square; resizing and cropping an image into its target size.

Bucketing trains each image at the bucket whose aspect ratio is nearest its own, so a portrait photo is
not cut down to a square. Buckets have sides that are multiples of 64 (the UNet downsamples by 8 in latent
space, SD's VAE by 8) and at most `resolution²` pixels. The assignment depends only on the image size and
the settings, so it is the same in every run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

BUCKET_STEP = 64


def make_buckets(resolution: int, min_side: int, max_side: int, step: int = BUCKET_STEP) -> list[tuple[int, int]]:
    """All (width, height) buckets: for every width, the tallest height within the pixel budget."""
    budget = resolution * resolution
    lo = max(step, (min_side // step) * step)
    hi = max(lo, (max_side // step) * step)
    buckets = set()
    for w in range(lo, hi + 1, step):
        h = min(hi, (budget // w) // step * step)
        if h >= lo:
            buckets.add((w, h))
            buckets.add((h, w))
    if not buckets:   # min_side too large for the budget: fall back to the square
        side = max(step, (resolution // step) * step)
        buckets.add((side, side))
    return sorted(buckets)


def assign_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket with the nearest aspect ratio (log scale, so 2:1 and 1:2 are equally far from 1:1);
    ties go to the larger bucket, then the wider one, so the choice never depends on list order."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - ratio), 9), -b[0] * b[1], -b[0]))


def target_size(width: int, height: int, settings) -> tuple[int, int]:
    """(width, height) an image of this size is trained at, under `DataSettings`."""
    if settings.bucketing:
        return assign_bucket(width, height, make_buckets(settings.resolution, settings.effective_bucket_min_side,
                                                         settings.effective_bucket_max_side))
    return settings.resolution, settings.resolution


@dataclass(frozen=True)
class Placement:
    """How an image of `original` size becomes a `target`-sized training image."""

    original: tuple[int, int]     # (width, height) after EXIF
    resized: tuple[int, int]      # (width, height) after scaling
    target: tuple[int, int]       # (width, height) of the bucket / square
    crop_left: int
    crop_top: int

    def crop_top_left(self, flipped: bool = False) -> tuple[int, int]:
        """(top, left) of the crop in the resized image, as SDXL's size conditioning wants it; a flip
        mirrors the crop window, so `left` is measured from the other side."""
        left = self.resized[0] - self.crop_left - self.target[0] if flipped else self.crop_left
        return self.crop_top, left


def place(width: int, height: int, target: tuple[int, int], *, crop: bool = True) -> Placement:
    """Scale so the image covers `target`, then centre-crop the overflow (`crop=False`: squash instead)."""
    tw, th = target
    if not crop:
        return Placement((width, height), (tw, th), target, 0, 0)
    scale = max(tw / width, th / height)
    rw, rh = max(tw, round(width * scale)), max(th, round(height * scale))
    return Placement((width, height), (rw, rh), target, (rw - tw) // 2, (rh - th) // 2)


def placement_for(width: int, height: int, settings) -> Placement:
    target = target_size(width, height, settings)
    crop = True if settings.bucketing else settings.center_crop
    return place(width, height, target, crop=crop)


def apply_placement(image, placement: Placement):
    """Resize + crop a PIL RGB image per `placement` (Lanczos when shrinking, bicubic when enlarging)."""
    from PIL import Image

    if image.size != placement.original:
        raise ValueError(f"image is {image.size}, placement was computed for {placement.original}")
    shrinking = placement.resized[0] < placement.original[0]
    resample = Image.Resampling.LANCZOS if shrinking else Image.Resampling.BICUBIC
    if placement.resized != image.size:
        image = image.resize(placement.resized, resample=resample)
    l, t = placement.crop_left, placement.crop_top
    if (l, t) != (0, 0) or placement.resized != placement.target:
        image = image.crop((l, t, l + placement.target[0], t + placement.target[1]))
    return image


__all__ = ["BUCKET_STEP", "make_buckets", "assign_bucket", "target_size", "Placement", "place", "placement_for",
           "apply_placement"]
