"""The toy world: 64×64 images of one flat-coloured object on a flat background, with captions.

A contract others can draw for (README "Toy world"): the vocabulary below is everything the pretrained toy base can
be asked for. A *subject* is an object the vocabulary cannot name (two colours, a stripe, a dot, an unusual
outline), the way a particular dog is more than "a dog": DreamBooth has to teach it.

Objects are drawn at 4× and reduced (anti-aliased edges), at a random position and size, never rotated.
Everything is seeded: the same (seed, index) draws the same image on every machine.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

SIZE = 64
CLASS_NOUN = "toy"
SHAPES = ("circle", "square", "triangle", "star", "heart", "ring")
# outlines the vocabulary has no word for: only subjects use them
EXTRA_SHAPES = ("plus", "diamond", "crescent")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
# the backgrounds share the colours' RGB values (and names), gray aside
BACKGROUNDS = {name: COLOURS.get(name, (128, 128, 128))
               for name in ("white", "black", "gray", "blue", "green", "yellow")}
PATTERNS = ("plain", "split", "stripes", "dot")
MIN_OBJECT, MAX_OBJECT = 24, 48   # object size in pixels (its square box)
_SCALE = 4                        # drawn at 4× then reduced: smooth edges like a photo's


@dataclass(frozen=True)
class Toy:
    """One object: an outline, a main colour and, for subjects, a pattern in a second colour."""
    shape: str
    colour: str
    pattern: str = "plain"
    second: str | None = None      # the pattern's colour (split: right half; stripes: every other band; dot: centre)

    def __post_init__(self):
        if self.shape not in SHAPES + EXTRA_SHAPES:
            raise ValueError(f"shape {self.shape!r}: choose one of {', '.join(SHAPES + EXTRA_SHAPES)}")
        for c in (self.colour, self.second):
            if c is not None and c not in COLOURS:
                raise ValueError(f"colour {c!r}: choose one of {', '.join(COLOURS)}")
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern {self.pattern!r}: choose one of {', '.join(PATTERNS)}")
        if (self.pattern == "plain") != (self.second is None):
            raise ValueError("a pattern needs a second colour, and 'plain' takes none")

    @property
    def colours(self) -> tuple[str, ...]:
        return (self.colour,) if self.second is None else (self.colour, self.second)

    @property
    def nameable(self) -> bool:
        """True when "a {colour} {shape} toy" describes it completely (the pretraining world)."""
        return self.pattern == "plain" and self.shape in SHAPES


@dataclass(frozen=True)
class Subject:
    """A DreamBooth subject: a toy the vocabulary cannot name, with the token users give it."""
    name: str
    toy: Toy
    token: str = "sks"
    backgrounds: tuple[str, ...] = field(default=tuple(BACKGROUNDS))

    def allowed_backgrounds(self) -> list[str]:
        return [b for b in self.backgrounds if b not in self.toy.colours]


# DreamBench in miniature: five subjects, each something the vocabulary cannot say.
SUBJECTS = {
    "split_circle": Subject("split_circle", Toy("circle", "red", "split", "blue")),
    "striped_square": Subject("striped_square", Toy("square", "yellow", "stripes", "purple")),
    "dotted_heart": Subject("dotted_heart", Toy("heart", "green", "dot", "orange")),
    "purple_plus": Subject("purple_plus", Toy("plus", "purple")),
    "dotted_star": Subject("dotted_star", Toy("star", "yellow", "dot", "blue")),
}


# Outlines, as polygons in a unit box (x right, y down) -------------------------------------------------------------

def _star(points: int = 5, inner: float = 0.42) -> list[tuple[float, float]]:
    out = []
    for i in range(points * 2):
        r = 0.5 if i % 2 == 0 else 0.5 * inner
        a = -math.pi / 2 + i * math.pi / points
        out.append((0.5 + r * math.cos(a), 0.53 + r * math.sin(a)))
    return out


def _heart(n: int = 96) -> list[tuple[float, float]]:
    pts = []
    for i in range(n):
        t = 2 * math.pi * i / n
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((x, -y))
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    return [((x - x0) / (x1 - x0), (y - y0) / (y1 - y0)) for x, y in pts]


_POLYGONS = {
    "square": [(0, 0), (1, 0), (1, 1), (0, 1)],
    "triangle": [(0.5, 0), (1, 1), (0, 1)],
    "star": _star(),
    "heart": _heart(),
    "plus": [(0.34, 0), (0.66, 0), (0.66, 0.34), (1, 0.34), (1, 0.66), (0.66, 0.66), (0.66, 1), (0.34, 1),
             (0.34, 0.66), (0, 0.66), (0, 0.34), (0.34, 0.34)],
    "diamond": [(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)],
}


def object_mask(shape: str, box: int):
    """An 'L' mask of `shape` filling a box×box square (255 inside)."""
    from PIL import Image, ImageDraw

    mask = Image.new("L", (box, box), 0)
    d = ImageDraw.Draw(mask)
    e = box - 1
    if shape in ("circle", "ring", "crescent"):
        d.ellipse([0, 0, e, e], fill=255)
        if shape == "ring":
            h = box * 0.24
            d.ellipse([h, h, e - h, e - h], fill=0)
        elif shape == "crescent":
            d.ellipse([box * 0.32, -box * 0.1, e + box * 0.25, e - box * 0.1], fill=0)
    else:
        d.polygon([(x * e, y * e) for x, y in _POLYGONS[shape]], fill=255)
    return mask


def _pattern_layer(toy: Toy, box: int):
    """The object's paint: its colour with the pattern in the second colour, box×box RGB."""
    from PIL import Image, ImageDraw

    paint = Image.new("RGB", (box, box), COLOURS[toy.colour])
    if toy.second is None:
        return paint
    d = ImageDraw.Draw(paint)
    second = COLOURS[toy.second]
    if toy.pattern == "split":
        d.rectangle([box // 2, 0, box, box], fill=second)
    elif toy.pattern == "stripes":
        band = box / 5
        for i in (1, 3):
            d.rectangle([0, round(i * band), box, round((i + 1) * band) - 1], fill=second)
    elif toy.pattern == "dot":
        r = box * 0.2
        cy = box * (0.56 if toy.shape in ("star", "triangle") else 0.5)
        d.ellipse([box / 2 - r, cy - r, box / 2 + r, cy + r], fill=second)
    return paint


def render(toy: Toy, background: str, rng: random.Random, size: int = SIZE,
           box: int | None = None, position: tuple[int, int] | None = None):
    """One 64×64 RGB image: `toy` on a flat `background`, random size and position from `rng`."""
    from PIL import Image

    if background not in BACKGROUNDS:
        raise ValueError(f"background {background!r}: choose one of {', '.join(BACKGROUNDS)}")
    box = box or rng.randint(MIN_OBJECT * size // SIZE, MAX_OBJECT * size // SIZE)
    x, y = position or (rng.randint(0, size - box), rng.randint(0, size - box))
    s = _SCALE
    canvas = Image.new("RGB", (size * s, size * s), BACKGROUNDS[background])
    canvas.paste(_pattern_layer(toy, box * s), (x * s, y * s), object_mask(toy.shape, box * s))
    return canvas.resize((size, size), Image.Resampling.BOX)


# Captions ---------------------------------------------------------------------------------------------------------

def caption(colour: str | None = None, shape: str | None = None, background: str | None = None,
            noun: str = CLASS_NOUN) -> str:
    """"a {colour} {shape} toy on a {background} background", any part left out."""
    words = ["a"] + [w for w in (colour, shape) if w] + [noun]
    if background:
        words += ["on", "a", background, "background"]
    return " ".join(words)


def instance_prompt(token: str, background: str | None = None) -> str:
    return caption(token, None, background)


def pretraining_caption(toy: Toy, background: str, rng: random.Random, drop: float = 0.1,
                        class_only: float = 0.0) -> str:
    """A caption with parts left out at random, so each part can be asked for alone; '' (for guidance) with
    probability `drop`; the bare class caption "a toy" with probability `class_only` besides the ~1.4 % it gets
    when all three parts happen to be left out (a class prompt seen that rarely is learnt as a few favourite toys,
    not as the spread of the world)."""
    if rng.random() < drop:
        return ""
    if class_only and rng.random() < class_only:
        return caption()
    return caption(toy.colour if rng.random() < 0.75 else None,
                   toy.shape if rng.random() < 0.75 else None,
                   background if rng.random() < 0.75 else None)


def random_world_toy(rng: random.Random) -> tuple[Toy, str]:
    """A nameable toy and a background it can be seen on (never its own colour)."""
    background = rng.choice(list(BACKGROUNDS))
    colour = rng.choice([c for c in COLOURS if COLOURS[c] != BACKGROUNDS[background]])
    return Toy(rng.choice(SHAPES), colour), background


def draw_world(count: int, seed: int = 0, drop: float = 0.1):
    """`count` (image, caption, toy, background) of the pretraining world."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        toy, bg = random_world_toy(rng)
        out.append((render(toy, bg, rng), pretraining_caption(toy, bg, rng, drop), toy, bg))
    return out


def draw_subject(subject: Subject, count: int, seed: int = 0, backgrounds: list[str] | None = None):
    """`count` images of one subject, cycling through backgrounds it can be seen on."""
    rng = random.Random(seed)
    bgs = backgrounds or subject.allowed_backgrounds()
    return [render(subject.toy, bgs[i % len(bgs)], rng) for i in range(count)]


def parse_toy(text: str) -> Toy:
    """'red circle', 'red/blue split circle', 'yellow/purple stripes square' -> Toy (the CLI's spelling)."""
    words = text.replace("-", " ").split()
    if len(words) == 2:
        colours, shape = words
        pattern = "plain"
    elif len(words) == 3:
        colours, pattern, shape = words
    else:
        raise ValueError(f"toy {text!r}: write 'COLOUR SHAPE' or 'COLOUR/COLOUR PATTERN SHAPE' "
                         f"(patterns: {', '.join(PATTERNS[1:])})")
    parts = colours.split("/")
    return Toy(shape, parts[0], pattern, parts[1] if len(parts) > 1 else None)


__all__ = ["SIZE", "CLASS_NOUN", "SHAPES", "EXTRA_SHAPES", "COLOURS", "BACKGROUNDS", "PATTERNS", "Toy", "Subject",
           "SUBJECTS", "render", "object_mask", "caption", "instance_prompt", "pretraining_caption",
           "random_world_toy", "draw_world", "draw_subject", "parse_toy"]
