"""Masks for masked loss: which part of an instance image is the subject.

A mask is a greyscale image of the instance image's size: white = subject (full loss weight), black =
background (`unmasked_weight`), grey in between. Where it comes from, first found wins:

1. `<name>-masklabel.png` beside the image `<name>.<ext>` (OneTrainer's layout);
2. a file of the same name in the concept's `mask_dir` (kohya's layout; a mask `<name>.png` is also found for
   `<name>.jpg`);
3. the image's own alpha channel (transparent = background).

Masks follow the image through everything that places it: the same resize, crop and flip (`apply_placement`,
the same PIL calls), then an area average down to latent size (each latent cell gets the fraction of its
pixels that are subject). They are cached beside the latents (in the same cache, under a key of the mask's
bytes, the placement and the flip: a changed mask gets a new key). Class (prior) images are never masked.

The scan (`scan_masks`) also finds what cannot be used, for the dataset report: a mask whose image is missing,
a mask of another size than its image, an unreadable mask file.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

from .buckets import apply_placement
from .cache import make_key
from .images import IMAGE_EXTENSIONS, BadImageError, load_image, probe_image

MASK_SUFFIX = "-masklabel.png"
MASK_SOURCES = ("masklabel", "mask_dir", "alpha")


def is_mask_label(path: str) -> bool:
    """Whether `path` is a OneTrainer mask file (`<name>-masklabel.png`): a mask, never a training image."""
    return os.path.basename(path).lower().endswith(MASK_SUFFIX)


@dataclass(frozen=True)
class MaskFile:
    """Where one instance image's mask comes from."""

    path: str             # the mask file (for "alpha": the image itself)
    source: str           # one of MASK_SOURCES
    content_hash: str     # sha256 of the mask file's bytes (for "alpha": the image's)


@dataclass
class MaskScan:
    """The masks of one concept's instance images, and the mask files that cannot be used."""

    found: dict = field(default_factory=dict)        # image path -> MaskFile
    problems: list = field(default_factory=list)     # [[mask path, reason]]: not used, and why


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _image_files(folder: str) -> list[str]:
    if not folder or not os.path.isdir(folder):
        return []
    names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    return [os.path.join(folder, n) for n in names
            if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS and os.path.isfile(os.path.join(folder, n))]


def _candidates(image_path: str, mask_dir: str, mask_dir_files: dict) -> list[tuple[str, str]]:
    """(mask path, source) for an image, in the order they are tried."""
    out = []
    label = os.path.join(os.path.dirname(image_path), _stem(image_path) + MASK_SUFFIX)
    if os.path.isfile(label):
        out.append((label, "masklabel"))
    if mask_dir:
        same = os.path.join(mask_dir, os.path.basename(image_path))
        if os.path.isfile(same):
            out.append((same, "mask_dir"))
        else:
            out += [(p, "mask_dir") for p in mask_dir_files.get(_stem(image_path), [])[:1]]
    return out


def scan_masks(images, instance_dir: str, mask_dir: str = "", probe=probe_image) -> MaskScan:
    """Find the mask of each usable instance image (`images`: scan.ScannedImage, with .path and .info) and the
    mask files that cannot be used. `probe(path) -> ImageInfo` checks a mask file (size, hash; scan.py passes
    its memoised probe)."""
    scan = MaskScan()
    mask_dir_files: dict[str, list[str]] = {}
    for path in _image_files(mask_dir):
        mask_dir_files.setdefault(_stem(path), []).append(path)
    for img in images:
        for path, source in _candidates(img.path, mask_dir, mask_dir_files):
            try:
                info = probe(path)
            except (BadImageError, OSError) as e:
                scan.problems.append([path, f"unreadable mask ({getattr(e, 'reason', e)}); {img.path} trains "
                                            "without a mask until it is fixed"])
                continue
            if (info.width, info.height) != (img.info.width, img.info.height):
                scan.problems.append([path, f"mask is {info.width}x{info.height} but its image {img.path} is "
                                            f"{img.info.width}x{img.info.height}; save the mask at the image's size "
                                            "(the image trains without a mask until then)"])
                continue
            scan.found[img.path] = MaskFile(path, source, info.content_hash)
            break
        else:
            if img.info.has_alpha:
                scan.found[img.path] = MaskFile(img.path, "alpha", img.info.content_hash)
    # masks whose image is not in the folder (any image file there counts, usable or not)
    stems = {_stem(p) for p in _image_files(instance_dir) if not is_mask_label(p)}
    for path in _image_files(instance_dir):
        if is_mask_label(path) and os.path.basename(path)[:-len(MASK_SUFFIX)] not in stems:
            scan.problems.append([path, f"mask without an image: no {os.path.basename(path)[:-len(MASK_SUFFIX)]}.* "
                                        "in the folder; rename it to <image name>-masklabel.png or remove it"])
    for stem, paths in sorted(mask_dir_files.items()):
        if stem not in stems:
            scan.problems += [[p, f"mask without an image: no {stem}.* in {instance_dir}; name masks in mask_dir "
                                  "like their images or remove it"] for p in paths]
    return scan


# ---- loading and placing ---------------------------------------------------------------------------------------
def load_mask(mask: MaskFile):
    """The mask as an upright greyscale ("L") PIL image of the (upright) image's size."""
    from PIL import Image, ImageOps

    if mask.source != "alpha":
        return load_image(mask.path, (0, 0, 0)).convert("L")     # any mode, EXIF applied; transparent = black
    with warnings.catch_warnings():      # the scan refused anything over MAX_IMAGE_PIXELS; PIL's lower warning aside
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        source = Image.open(mask.path)
        source.load()
    with source:
        try:
            im = ImageOps.exif_transpose(source)
        except Exception:  # noqa: BLE001 - broken EXIF: keep the pixels as stored (as load_image does)
            im = source.copy()
    if im.mode == "P" or "A" in im.getbands() or im.mode in ("LA", "PA", "RGBa", "La"):
        return im.convert("RGBA").getchannel("A")
    return Image.new("L", im.size, 255)


def placed_mask(mask: MaskFile, placement, flipped: bool, factor: int):
    """The mask placed like its image (resize, crop, flip) and area-averaged to latent size: (1, h, w) float32
    in [0, 1], `factor` = the VAE's downsampling."""
    import numpy as np
    import torch

    image = apply_placement(load_mask(mask), placement)
    if flipped:
        from PIL import Image

        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None, None]
    return torch.nn.functional.avg_pool2d(pixels, factor)[0]


def mask_key(mask: MaskFile, placement, flipped: bool, factor: int) -> str:
    p = placement
    return make_key("mask", mask.source, mask.content_hash, p.original, p.resized, p.target, p.crop_left, p.crop_top,
                    bool(flipped), factor)


def latent_mask(data, item, flipped: bool):
    """The (1, h, w) latent-size mask of `item` (a dataset Item with a mask), from `data`'s latent cache when on."""
    factor = data.model.vae_scale_factor
    compute = lambda: {"mask": placed_mask(item.mask, item.placement, flipped, factor)}  # noqa: E731
    if data.latent_cache is None:
        return compute()["mask"]
    shape = (1, item.bucket[1] // factor, item.bucket[0] // factor)
    expect = lambda t: set(t) == {"mask"} and tuple(t["mask"].shape) == shape  # noqa: E731
    return data.latent_cache.get_or_compute(mask_key(item.mask, item.placement, flipped, factor), compute,
                                            expect)["mask"]


def batch_masks(data, items, flips):
    """(B, 1, h, w) float32 masks of a batch (all ones for examples without a mask, class images included), or
    None when no example of it has a mask."""
    import torch

    if not any(item.mask is not None for item in items):
        return None
    rows = []
    for item, f in zip(items, flips):
        if item.mask is not None:
            rows.append(latent_mask(data, item, f))
        else:
            factor = data.model.vae_scale_factor
            rows.append(torch.ones((1, item.bucket[1] // factor, item.bucket[0] // factor)))
    return torch.stack(rows)


def fill_mask_cache(data, flips) -> None:
    """Place and cache every mask (each flip used) not yet in `data`'s latent cache; cheap, no model."""
    for item in data.items:
        if item.mask is not None:
            for f in flips:
                latent_mask(data, item, f)


def content_hashes(items) -> list[str]:
    """What names the data in a run's identity: each example's content hash, with its mask's when it has one
    (so a changed mask makes a new run, and data without masks keeps the identity it always had)."""
    return [item.content_hash + (f"+mask:{item.mask.source}:{item.mask.content_hash}" if item.mask else "")
            for item in items]


__all__ = ["MASK_SUFFIX", "MASK_SOURCES", "is_mask_label", "MaskFile", "MaskScan", "scan_masks", "load_mask",
           "placed_mask", "mask_key", "latent_mask", "batch_masks", "fill_mask_cache", "content_hashes"]
