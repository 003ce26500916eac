"""torchvision.transforms stand-in: the transforms diffusers' DreamBooth examples build (PIL images in)."""
from __future__ import annotations

import numbers

import torch

from . import functional
from .functional import InterpolationMode

__all__ = ["Compose", "Resize", "CenterCrop", "RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize",
           "InterpolationMode", "functional"]


def _pair(size, what: str) -> tuple[int, int]:
    if isinstance(size, numbers.Number):
        return int(size), int(size)
    if isinstance(size, (list, tuple)) and len(size) == 1:
        return int(size[0]), int(size[0])
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return int(size[0]), int(size[1])
    raise ValueError(f"{what}: size must be an int or a (height, width) pair, got {size!r}")


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, img):
        for t in self.transforms:
            img = t(img)
        return img

    def __repr__(self):
        return f"Compose({self.transforms!r})"


class Resize(torch.nn.Module):
    """int size: the shorter side becomes `size` (aspect kept); (h, w): exactly that size."""

    def __init__(self, size, interpolation=InterpolationMode.BILINEAR, max_size=None, antialias=True):
        super().__init__()
        self.size, self.interpolation, self.max_size, self.antialias = size, interpolation, max_size, antialias

    def forward(self, img):
        return functional.resize(img, self.size, self.interpolation, self.max_size, self.antialias)


class CenterCrop(torch.nn.Module):
    def __init__(self, size):
        super().__init__()
        self.size = _pair(size, "CenterCrop")

    def forward(self, img):
        return functional.center_crop(img, self.size)


class RandomCrop(torch.nn.Module):
    """A random (h, w) window; the offsets come from torch's global generator (as torchvision's)."""

    def __init__(self, size, padding=None, pad_if_needed=False, fill=0, padding_mode="constant"):
        super().__init__()
        if padding is not None or padding_mode != "constant":
            raise NotImplementedError("stand-in RandomCrop: padding is not implemented")
        self.size, self.pad_if_needed, self.fill = _pair(size, "RandomCrop"), pad_if_needed, fill

    @staticmethod
    def get_params(img, output_size):
        w, h = functional.get_image_size(img)
        th, tw = output_size
        if h < th or w < tw:
            raise ValueError(f"Required crop size {(th, tw)} is larger than input image size {(h, w)}")
        if w == tw and h == th:
            return 0, 0, h, w
        i = torch.randint(0, h - th + 1, size=(1,)).item()
        j = torch.randint(0, w - tw + 1, size=(1,)).item()
        return i, j, th, tw

    def forward(self, img):
        th, tw = self.size
        w, h = functional.get_image_size(img)
        if self.pad_if_needed and (h < th or w < tw):
            img = functional.pad_to(img, max(w, tw), max(h, th), self.fill)
        i, j, h, w = self.get_params(img, self.size)
        return functional.crop(img, i, j, h, w)


class RandomHorizontalFlip(torch.nn.Module):
    def __init__(self, p=0.5):
        super().__init__()
        self.p = p

    def forward(self, img):
        return functional.hflip(img) if torch.rand(1).item() < self.p else img


class ToTensor:
    """PIL image / HWC uint8 array -> float CHW tensor in [0, 1]."""

    def __call__(self, pic):
        return functional.to_tensor(pic)

    def __repr__(self):
        return "ToTensor()"


class Normalize(torch.nn.Module):
    def __init__(self, mean, std, inplace=False):
        super().__init__()
        self.mean, self.std, self.inplace = mean, std, inplace

    def forward(self, tensor):
        return functional.normalize(tensor, self.mean, self.std, self.inplace)
