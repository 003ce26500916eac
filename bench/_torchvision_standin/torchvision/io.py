"""torchvision.io stand-in: transformers imports the module when it sees a torchvision; nothing here decodes."""
from enum import Enum


class ImageReadMode(Enum):
    UNCHANGED = 0
    GRAY = 1
    GRAY_ALPHA = 2
    RGB = 3
    RGB_ALPHA = 4


def _unavailable(*args, **kwargs):
    raise NotImplementedError("the bench torchvision stand-in does not decode images or videos")


decode_image = read_image = read_file = read_video = read_video_timestamps = VideoReader = _unavailable
