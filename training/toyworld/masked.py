"""Subjects with masks, for masked-loss runs (issue 20.3): the toy world knows where its object is, so each subject
image can come with an exact mask (white = the toy, black = the background, anti-aliased edges in between).

The images are exactly draw_subject's (the same draws from the same seed); the mask is the same toy drawn white on
black through the same renderer (same box, position and reduction), scaled to 0..255. `write_masked_subject` saves
them in OneTrainer's layout (`<name>.png` + `<name>-masklabel.png`), which the data scan reads (data/masks.py).
"""
from __future__ import annotations

import os
import random

from .world import BACKGROUNDS, COLOURS, MAX_OBJECT, MIN_OBJECT, SIZE, Subject, Toy, render

_INK, _PAPER = "white", "black"          # the silhouette's colours: a toy of the first on a background of the second


def render_with_mask(toy: Toy, background: str, rng: random.Random, size: int = SIZE):
    """(image, mask): `render(toy, background, rng, size)` as it would draw it, and its 'L' mask."""
    box = rng.randint(MIN_OBJECT * size // SIZE, MAX_OBJECT * size // SIZE)      # render's own draws, in its order
    position = (rng.randint(0, size - box), rng.randint(0, size - box))
    image = render(toy, background, rng, size, box=box, position=position)
    silhouette = render(Toy(toy.shape, _INK), _PAPER, rng, size, box=box, position=position).getchannel(0)
    lo, hi = BACKGROUNDS[_PAPER][0], COLOURS[_INK][0]
    mask = silhouette.point(lambda v: max(0, min(255, round((v - lo) * 255 / (hi - lo)))))
    return image, mask


def draw_subject_with_masks(subject: Subject, count: int, seed: int = 0, backgrounds: list[str] | None = None):
    """`count` (image, mask) of one subject: the images of `draw_subject(subject, count, seed, backgrounds)`."""
    rng = random.Random(seed)
    bgs = backgrounds or subject.allowed_backgrounds()
    return [render_with_mask(subject.toy, bgs[i % len(bgs)], rng) for i in range(count)]


def write_masked_subject(folder: str, subject: Subject, count: int, seed: int = 0,
                         backgrounds: list[str] | None = None) -> list[str]:
    """Save `count` subject images and their masks in `folder` (`NNN.png` + `NNN-masklabel.png`); the image paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, (image, mask) in enumerate(draw_subject_with_masks(subject, count, seed, backgrounds)):
        path = os.path.join(folder, f"{i:03d}.png")
        image.save(path)
        mask.save(os.path.join(folder, f"{i:03d}-masklabel.png"))
        paths.append(path)
    return paths


__all__ = ["render_with_mask", "draw_subject_with_masks", "write_masked_subject"]
