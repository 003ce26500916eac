"""A minimal stand-in for torchvision (bench/run.py's diffusers comparison only; see ../README.md).

Implements the part of `torchvision.transforms` that diffusers' DreamBooth example scripts use, on PIL images with
PIL + torch: Compose, Resize, CenterCrop, RandomCrop, RandomHorizontalFlip, ToTensor, Normalize, InterpolationMode
and the matching `transforms.functional` functions, with torchvision's semantics for those inputs.
"""
__version__ = "0.0.0+benchstandin"
STANDIN = True

from . import io, transforms  # noqa: E402,F401
