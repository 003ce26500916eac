"""Read a toy-world image back: background, object colour(s), shape, and whether it shows a given subject.

An analysis, not a learned model, so nothing it was fitted on can leak into the numbers it gives:
- background: the median colour of the image's border, named by the nearest background of the vocabulary;
- object: the pixels far from that background; each is named by the nearest colour of the vocabulary (edge pixels
  that are a blend of two colours are left out); colours holding >= 15 % of the object are its colours;
- shape: the object's mask, cropped to its box and reduced to 24×24, against the mask of each shape of the
  vocabulary (IoU, the highest wins; the world never rotates objects, so a box-normalised mask is enough);
- subject: a colour layout (the object's box on a 10×10 grid, each cell a distribution over the vocabulary's colours
  and the background) compared (share of the grid that agrees) with the subject's own instance images (mean over them: the
  DINO / CLIP-I analogue). "Shows the subject" = that similarity at or above a threshold calibrated on renders of
  the subject against renders of everything else (`calibrate_subject`), and every subject colour present.
`check_accuracy` measures it on held-out renders with noise and blur (the README gives the numbers).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from .world import BACKGROUNDS, COLOURS, PATTERNS, SHAPES, SIZE, Subject, Toy, object_mask, random_world_toy, render

_COLOUR_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _COLOUR_NAMES], dtype=np.float32)
_BG_NAMES = list(BACKGROUNDS)
_BG_PALETTE = np.array([BACKGROUNDS[b] for b in _BG_NAMES], dtype=np.float32)
FOREGROUND_DISTANCE = 45.0      # RGB distance from the background above which a pixel belongs to the object
BLEND_DISTANCE = 70.0           # an object pixel further than this from every colour is an edge blend: ignored
MIN_OBJECT_PIXELS = 20
COLOUR_SHARE = 0.15
MASK_SIZE = 24
LAYOUT_CELLS = 10


@dataclass
class Reading:
    background: str
    colour: str | None                   # the main colour (None: no object found)
    colours: tuple[str, ...]             # every colour holding >= COLOUR_SHARE of the object
    shape: str | None
    shape_score: float                   # IoU with the chosen shape's mask
    object_pixels: int
    layout: np.ndarray | None            # the colour layout (for subject similarity)


def _array(image) -> np.ndarray:
    if hasattr(image, "convert"):
        image = image.convert("RGB")
        if image.size != (SIZE, SIZE):
            from PIL import Image
            image = image.resize((SIZE, SIZE), Image.Resampling.BOX)
        return np.asarray(image, dtype=np.float32)
    arr = np.asarray(image, dtype=np.float32)
    return arr * 255.0 if arr.max() <= 1.0 else arr      # ComfyUI IMAGE rows are 0..1


def _templates() -> dict[str, np.ndarray]:
    global _TEMPLATES
    if _TEMPLATES is None:
        _TEMPLATES = {s: _box_mask(np.asarray(object_mask(s, 96), dtype=np.float32) > 127) for s in SHAPES}
    return _TEMPLATES


_TEMPLATES = None


def _box_mask(mask: np.ndarray) -> np.ndarray:
    from PIL import Image

    ys, xs = np.nonzero(mask)
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.uint8) * 255
    small = Image.fromarray(crop).resize((MASK_SIZE, MASK_SIZE), Image.Resampling.BILINEAR)
    return np.asarray(small, dtype=np.float32) > 127


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = ndimage.sum(mask, labels, range(1, n + 1))
    return labels == (int(np.argmax(sizes)) + 1)


def analyse(image) -> Reading:
    """What one image shows (PIL image, HWC array 0..255, or a ComfyUI IMAGE row 0..1)."""
    arr = _array(image)
    border = np.concatenate([arr[:2].reshape(-1, 3), arr[-2:].reshape(-1, 3),
                             arr[:, :2].reshape(-1, 3), arr[:, -2:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    background = _BG_NAMES[int(np.argmin(np.linalg.norm(_BG_PALETTE - bg_rgb, axis=1)))]
    mask = np.linalg.norm(arr - bg_rgb, axis=2) > FOREGROUND_DISTANCE
    mask = _largest_component(mask)
    count = int(mask.sum())
    if count < MIN_OBJECT_PIXELS:
        return Reading(background, None, (), None, 0.0, count, None)
    pixels = arr[mask]
    dist = np.linalg.norm(pixels[:, None, :] - _PALETTE[None], axis=2)
    nearest = dist.argmin(axis=1)
    clean = dist.min(axis=1) <= BLEND_DISTANCE
    labels = nearest[clean] if clean.any() else nearest
    shares = np.bincount(labels, minlength=len(_COLOUR_NAMES)) / max(1, len(labels))
    order = np.argsort(-shares)
    colours = tuple(_COLOUR_NAMES[i] for i in order if shares[i] >= COLOUR_SHARE)
    colour = _COLOUR_NAMES[int(order[0])]
    box = _box_mask(mask)
    scores = {s: float((box & t).sum() / max(1, (box | t).sum())) for s, t in _templates().items()}
    shape = max(scores, key=scores.get)
    return Reading(background, colour, colours or (colour,), shape, scores[shape], count,
                   _layout(arr, mask, nearest, clean))


def _layout(arr: np.ndarray, mask: np.ndarray, nearest: np.ndarray, clean: np.ndarray) -> np.ndarray:
    """The object's box on a 10×10 grid; each cell: shares of the vocabulary's colours and of 'not the object'."""
    n = len(_COLOUR_NAMES)
    label = np.full(mask.shape, n, dtype=np.int64)            # n = not the object
    obj = np.where(clean, nearest, n)
    label[mask] = obj
    ys, xs = np.nonzero(mask)
    crop = label[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    h, w = crop.shape
    cells = np.zeros((LAYOUT_CELLS, LAYOUT_CELLS, n + 1), dtype=np.float32)
    for i in range(LAYOUT_CELLS):
        for j in range(LAYOUT_CELLS):
            part = crop[i * h // LAYOUT_CELLS:max((i + 1) * h // LAYOUT_CELLS, i * h // LAYOUT_CELLS + 1),
                        j * w // LAYOUT_CELLS:max((j + 1) * w // LAYOUT_CELLS, j * w // LAYOUT_CELLS + 1)]
            cells[i, j] = np.bincount(part.ravel(), minlength=n + 1) / part.size
    return cells.reshape(-1, n + 1)


def similarity(a: Reading, b: Reading) -> float:
    """Agreement of two colour layouts: the share of the grid where both show the same (histogram intersection
    per cell, averaged); 1 = the same colours in the same places of the object's box, 0 when either shows none."""
    if a.layout is None or b.layout is None:
        return 0.0
    return float(np.minimum(a.layout, b.layout).sum(axis=1).mean())


class SubjectModel:
    """One subject as seen in its instance images: similarity to them and the decision "shows the subject"."""

    def __init__(self, instance_images, colours: tuple[str, ...] | None = None, threshold: float = 0.8):
        self.readings = [analyse(im) for im in instance_images]
        if not any(r.layout is not None for r in self.readings):
            raise ValueError("no object found in the subject's instance images")
        found = [c for r in self.readings for c in r.colours]
        self.colours = colours or tuple(sorted({c for c in found if found.count(c) * 2 >= len(self.readings)}))
        # its outline as the shape reading names it (an outline outside the vocabulary gets its nearest shape)
        shapes = [r.shape for r in self.readings if r.shape]
        self.outline = max(set(shapes), key=shapes.count)
        self.threshold = threshold

    def similarity(self, image_or_reading) -> float:
        r = image_or_reading if isinstance(image_or_reading, Reading) else analyse(image_or_reading)
        return float(np.mean([similarity(r, ref) for ref in self.readings]))

    def has_colours(self, reading: Reading) -> bool:
        return reading.layout is not None and set(self.colours) <= set(reading.colours)

    def could_be(self, reading: Reading) -> bool:
        """Its colours and its outline: what any picture of the subject has before its pattern is compared."""
        return self.has_colours(reading) and reading.shape == self.outline

    def shows(self, image_or_reading) -> bool:
        r = image_or_reading if isinstance(image_or_reading, Reading) else analyse(image_or_reading)
        return self.could_be(r) and self.similarity(r) >= self.threshold


def degrade(image, rng: random.Random):
    """A render made harder: blur (sigma 0..1.2), Gaussian noise (std 0..12), JPEG-like colour shift."""
    from PIL import Image, ImageFilter

    img = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 1.2)))
    arr = np.asarray(img, dtype=np.float32)
    arr = arr + np.random.default_rng(rng.randrange(1 << 30)).normal(0, rng.uniform(0, 12), arr.shape)
    arr = arr + np.array([rng.uniform(-10, 10) for _ in range(3)], dtype=np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def calibrate_subject(subject: Subject, instance_images, count: int = 200, seed: int = 1) -> SubjectModel:
    """A SubjectModel whose threshold best separates fresh renders of the subject (degraded) from renders of
    world toys and of toys sharing the subject's shape or colours (degraded); never from generated images."""
    model = SubjectModel(instance_images, subject.toy.colours)
    rng = random.Random(seed)
    pos, neg = _calibration_sets(subject, count, rng)
    pos, neg = [analyse(im) for im in pos], [analyse(im) for im in neg]
    scores = [(model.similarity(r), model.could_be(r), True) for r in pos] + \
             [(model.similarity(r), model.could_be(r), False) for r in neg]
    best, best_right = 0.8, -1
    for t in sorted({round(s, 4) for s, _, _ in scores}):
        right = sum((s >= t and colours) == is_subject for s, colours, is_subject in scores)
        if right > best_right:
            best, best_right = float(t), right
    model.threshold = best
    return model


def _calibration_sets(subject: Subject, count: int, rng: random.Random):
    bgs = subject.allowed_backgrounds()
    pos = [degrade(render(subject.toy, rng.choice(bgs), rng), rng) for _ in range(count)]
    neg = []
    for i in range(count):
        if i % 4 == 0:
            toy, bg = random_world_toy(rng)
        elif i % 4 == 3:       # its outline and colours in another arrangement: what only the layout tells apart
            toy, bg = _rearranged(subject.toy, rng), rng.choice(bgs)
        elif i % 4 == 1:       # the subject's outline plain, in one of its colours (another one if it has one)
            others = [c for c in COLOURS if c not in subject.toy.colours] if subject.toy.second is None \
                else list(subject.toy.colours)
            toy, bg = Toy(subject.toy.shape, rng.choice(others)), rng.choice(bgs)
            if toy.colour == bg:
                bg = next(b for b in BACKGROUNDS if b != toy.colour)
        else:                  # the subject's colours on another outline (plain or with its pattern)
            shape = rng.choice([s for s in SHAPES if s != subject.toy.shape])
            toy = Toy(shape, subject.toy.colour, subject.toy.pattern, subject.toy.second)
            bg = rng.choice(bgs)
        neg.append(degrade(render(toy, bg, rng), rng))
    return pos, neg


def _rearranged(toy: Toy, rng: random.Random) -> Toy:
    """The same outline and colours, arranged otherwise: another pattern, or the two colours swapped; a one-colour
    subject gets a second colour in a pattern."""
    if toy.second is None:
        return Toy(toy.shape, toy.colour, rng.choice(PATTERNS[1:]), rng.choice([c for c in COLOURS if c != toy.colour]))
    choices = [Toy(toy.shape, toy.second, toy.pattern, toy.colour)]
    choices += [Toy(toy.shape, a, p, b) for p in PATTERNS[1:] if p != toy.pattern
                for a, b in ((toy.colour, toy.second), (toy.second, toy.colour))]
    return rng.choice(choices)


def check_accuracy(count: int = 600, seed: int = 123) -> dict:
    """Per-attribute accuracy on held-out degraded renders of the world (colour, background, shape)."""
    rng = random.Random(seed)
    right = {"colour": 0, "background": 0, "shape": 0}
    for _ in range(count):
        toy, bg = random_world_toy(rng)
        r = analyse(degrade(render(toy, bg, rng), rng))
        right["colour"] += r.colour == toy.colour
        right["background"] += r.background == bg
        right["shape"] += r.shape == toy.shape
    return {k: v / count for k, v in right.items()}


def attribute_entropy(readings: list[Reading]) -> float:
    """Normalised entropy of the (colour, shape) pairs read from samples: 1 = spread evenly over the vocabulary."""
    pairs = [(r.colour, r.shape) for r in readings if r.colour is not None]
    if not pairs:
        return 0.0
    counts = np.array([pairs.count(p) for p in set(pairs)], dtype=np.float64) / len(pairs)
    return float(-(counts * np.log(counts)).sum() / np.log(len(COLOURS) * len(SHAPES)))


def diversity(readings: list[Reading]) -> float:
    """Mean pairwise layout distance (1 - agreement) between samples: the DIV analogue (LPIPS in the paper)."""
    found = [r for r in readings if r.layout is not None]
    n = len(found)
    if n < 2:
        return 0.0
    total = sum(1.0 - similarity(found[i], found[j]) for i in range(n) for j in range(i + 1, n))
    return float(total / (n * (n - 1) / 2))


__all__ = ["Reading", "analyse", "similarity", "SubjectModel", "calibrate_subject", "check_accuracy", "degrade",
           "attribute_entropy", "diversity"]
