"""torchvision.transforms.v2.functional stand-in: the v1 stand-in's functions."""
from ..functional import *  # noqa: F401,F403
from ..functional import InterpolationMode  # noqa: F401
