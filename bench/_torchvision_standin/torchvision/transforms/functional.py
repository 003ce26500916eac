"""torchvision.transforms.functional stand-in: PIL-image versions of what diffusers' DreamBooth examples call."""
from __future__ import annotations

import numbers
from enum import Enum

import numpy as np
import torch
from PIL import Image

__all__ = ["InterpolationMode", "get_image_size", "resize", "crop", "pad_to", "center_crop", "hflip", "to_tensor",
           "pil_to_tensor", "normalize"]


class InterpolationMode(Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


_PIL_MODES = {InterpolationMode.NEAREST: Image.NEAREST, InterpolationMode.NEAREST_EXACT: Image.NEAREST,
              InterpolationMode.BILINEAR: Image.BILINEAR, InterpolationMode.BICUBIC: Image.BICUBIC,
              InterpolationMode.BOX: Image.BOX, InterpolationMode.HAMMING: Image.HAMMING,
              InterpolationMode.LANCZOS: Image.LANCZOS}


def _pil(img, what: str) -> Image.Image:
    if not isinstance(img, Image.Image):
        raise TypeError(f"stand-in torchvision {what}: expected a PIL image, got {type(img).__name__}")
    return img


def get_image_size(img) -> list[int]:
    """[width, height] (torchvision's order)."""
    return list(_pil(img, "get_image_size").size)


def resize(img, size, interpolation=InterpolationMode.BILINEAR, max_size=None, antialias=True):
    img = _pil(img, "resize")
    if isinstance(interpolation, int):            # PIL constants are accepted too
        resample = interpolation
    else:
        resample = _PIL_MODES[InterpolationMode(interpolation)]
    w, h = img.size
    if isinstance(size, numbers.Number) or (isinstance(size, (list, tuple)) and len(size) == 1):
        requested = int(size if isinstance(size, numbers.Number) else size[0])
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = requested, int(requested * long / short)
        if max_size is not None and new_long > max_size:
            new_short, new_long = int(max_size * new_short / new_long), max_size
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    else:
        new_h, new_w = int(size[0]), int(size[1])
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), resample)


def crop(img, top: int, left: int, height: int, width: int):
    return _pil(img, "crop").crop((left, top, left + width, top + height))


def pad_to(img, width: int, height: int, fill=0):
    """Pad (right/bottom-centred like torchvision's symmetric padding) to at least width x height."""
    img = _pil(img, "pad")
    w, h = img.size
    canvas = Image.new(img.mode, (max(w, width), max(h, height)), fill)
    canvas.paste(img, ((canvas.size[0] - w) // 2, (canvas.size[1] - h) // 2))
    return canvas


def center_crop(img, output_size):
    img = _pil(img, "center_crop")
    if isinstance(output_size, numbers.Number):
        output_size = (int(output_size), int(output_size))
    elif len(output_size) == 1:
        output_size = (output_size[0], output_size[0])
    th, tw = int(output_size[0]), int(output_size[1])
    w, h = img.size
    if tw > w or th > h:
        img = pad_to(img, tw, th)
        w, h = img.size
    top = int(round((h - th) / 2.0))
    left = int(round((w - tw) / 2.0))
    return crop(img, top, left, th, tw)


def hflip(img):
    return _pil(img, "hflip").transpose(Image.FLIP_LEFT_RIGHT)


def to_tensor(pic) -> torch.Tensor:
    if isinstance(pic, np.ndarray):
        array = pic[:, :, None] if pic.ndim == 2 else pic
        tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
        return tensor.float().div(255) if tensor.dtype == torch.uint8 else tensor
    pic = _pil(pic, "to_tensor")
    if pic.mode == "1":
        pic = pic.convert("L")
    if pic.mode in ("I", "I;16", "F"):
        array = np.asarray(pic, dtype=np.float32)
        return torch.from_numpy(array.copy())[None]
    array = np.asarray(pic, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.transpose(2, 0, 1).copy()).float().div(255)


def pil_to_tensor(pic) -> torch.Tensor:
    """PIL image -> uint8 CHW tensor (no scaling)."""
    array = np.asarray(_pil(pic, "pil_to_tensor"))
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def normalize(tensor: torch.Tensor, mean, std, inplace: bool = False) -> torch.Tensor:
    if not tensor.is_floating_point():
        raise TypeError(f"normalize: expected a float tensor, got {tensor.dtype}")
    if not inplace:
        tensor = tensor.clone()
    mean = torch.as_tensor(mean, dtype=tensor.dtype, device=tensor.device)
    std = torch.as_tensor(std, dtype=tensor.dtype, device=tensor.device)
    if (std == 0).any():
        raise ValueError("normalize: std contains a zero")
    if mean.ndim == 1:
        mean = mean.view(-1, 1, 1)
    if std.ndim == 1:
        std = std.view(-1, 1, 1)
    return tensor.sub_(mean).div_(std)
