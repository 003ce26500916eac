"""torchvision.transforms.v2 stand-in: transformers imports `transforms.v2.functional` at import time when it sees a
torchvision; the same classes and functions as the v1 stand-in."""
from .. import (CenterCrop, Compose, InterpolationMode, Normalize, RandomCrop,  # noqa: F401
                RandomHorizontalFlip, Resize, ToTensor)
from . import functional  # noqa: F401
