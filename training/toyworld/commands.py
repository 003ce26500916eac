"""`comfyui-dreambooth toyworld base OUT.safetensors` and `comfyui-dreambooth toyworld draw DIR ...`."""
from __future__ import annotations

import argparse
import os
import random
import shutil

from .world import BACKGROUNDS, SUBJECTS, caption, draw_world, parse_toy, render

BASE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy_base.safetensors")


def base_path() -> str:
    """The shipped toy base (an SD1-layout single-file checkpoint, fp16; LoadBaseModel loads it in fp32)."""
    if not os.path.isfile(BASE_FILE):
        raise FileNotFoundError(f"the toy base is missing from the pack ({BASE_FILE}); reinstall the pack or make "
                                "one with: python -m comfyui_dreambooth.training.toyworld.pretrain --out FILE")
    return BASE_FILE


def write_base(out: str) -> str:
    """Copy the toy base to `out` (atomically; an existing file is replaced only by a complete copy)."""
    from ..fsutil import atomic_path, check_replaceable

    if not out.lower().endswith(".safetensors"):
        raise ValueError(f"{out}: the file name must end in .safetensors")
    check_replaceable(out)
    os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
    with atomic_path(out) as tmp:
        shutil.copyfile(base_path(), tmp)
    return out


def draw(folder: str, *, count: int, toy: str | None = None, subject: str | None = None,
         background: str | None = None, seed: int = 0, captions: bool = False) -> list[str]:
    """Draw `count` PNGs into `folder`: a subject (SUBJECTS), a toy ('red circle', 'red/blue split circle'), or,
    with neither, the pretraining world (random nameable toys; `captions` writes each one's caption beside it)."""
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    if subject or toy:
        if subject and subject not in SUBJECTS:
            raise ValueError(f"subject {subject!r}: choose one of {', '.join(SUBJECTS)}")
        what = SUBJECTS[subject].toy if subject else parse_toy(toy)
        name = subject or toy.replace("/", "-").replace(" ", "_")
        bgs = [background] if background else [b for b in BACKGROUNDS if b not in what.colours]
        for i in range(count):
            bg = bgs[i % len(bgs)]
            path = os.path.join(folder, f"{name}_{i:03d}.png")
            render(what, bg, rng).save(path)
            paths.append(path)
            if captions:
                _write_text(path, caption(None, None, bg))
        return paths
    for i, (image, text, _toy, _bg) in enumerate(draw_world(count, seed=seed, drop=0.0)):
        path = os.path.join(folder, f"toy_{i:03d}.png")
        image.save(path)
        paths.append(path)
        if captions:
            _write_text(path, text)
    return paths


SUBJECT_PREFIX = "toyworld:"      # a concept folder written as "toyworld:split_circle" (the toy example's)
SUBJECT_IMAGES = 5


def subject_name(spec: str) -> str | None:
    """'toyworld:NAME' → NAME (checked against SUBJECTS); anything else → None."""
    if not spec.strip().lower().startswith(SUBJECT_PREFIX):
        return None
    name = spec.strip()[len(SUBJECT_PREFIX):].strip()
    if name not in SUBJECTS:
        raise ValueError(f"{spec!r}: no toy-world subject {name!r}; choose one of "
                         + ", ".join(SUBJECT_PREFIX + n for n in SUBJECTS))
    return name


def subject_folder(name: str, root: str) -> str:
    """root/toyworld/NAME, holding the subject's instance images: drawn there (SUBJECT_IMAGES PNGs, fixed seed)
    unless the folder already has images, which are kept (a user may have replaced them)."""
    folder = os.path.join(root, "toyworld", name)
    if not (os.path.isdir(folder) and any(f.lower().endswith(".png") for f in os.listdir(folder))):
        draw(folder, count=SUBJECT_IMAGES, subject=name)
    return folder


def _write_text(image_path: str, text: str) -> None:
    with open(os.path.splitext(image_path)[0] + ".txt", "w", encoding="utf-8") as f:
        f.write(text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="toyworld_command", metavar="WHAT")
    sub.required = True
    b = sub.add_parser("base", help="write the toy base checkpoint (SD1 layout, a few MB) to OUT")
    b.add_argument("out", metavar="OUT.safetensors")
    d = sub.add_parser("draw", help="draw toy-world images into a folder (a subject, a toy, or the world)")
    d.add_argument("folder", metavar="DIR")
    d.add_argument("--count", type=int, default=5)
    d.add_argument("--subject", choices=sorted(SUBJECTS), help="one of the benchmark's subjects")
    d.add_argument("--toy", help="'COLOUR SHAPE' or 'COLOUR/COLOUR PATTERN SHAPE', e.g. 'red/blue split circle'")
    d.add_argument("--background", choices=sorted(BACKGROUNDS), help="one background for every image")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--captions", action="store_true", help="write each image's caption beside it (.txt)")


def main(args: argparse.Namespace) -> int:
    if args.toyworld_command == "base":
        print(write_base(args.out))
        return 0
    if args.count < 1:
        raise ValueError(f"--count {args.count}: must be at least 1")
    if args.subject and args.toy:
        raise ValueError("--subject and --toy: give one of them")
    paths = draw(args.folder, count=args.count, toy=args.toy, subject=args.subject, background=args.background,
                 seed=args.seed, captions=args.captions)
    print(f"{len(paths)} image(s) in {args.folder}")
    return 0


__all__ = ["BASE_FILE", "SUBJECT_PREFIX", "subject_name", "subject_folder", "base_path", "write_base", "draw", "add_arguments", "main"]
