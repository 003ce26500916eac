"""Image files as they come from real folders: find them, check them, load them as plain RGB.

Phone photos carry an EXIF orientation, PNGs carry transparency, scans are 16-bit or CMYK, and a folder
usually holds a few files that are not images at all or were cut off while copying. Everything here turns
such a file into an RGB `PIL.Image` the right way up, or raises `BadImageError` naming the file and the fix.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
CAPTION_EXTENSIONS = (".txt", ".caption")

# Our own limit, checked from the header before decoding: a "decompression bomb" is a small file that
# claims billions of pixels and would exhaust memory. 100 MP covers every ordinary camera photo.
MAX_IMAGE_PIXELS = 100_000_000


class BadImageError(Exception):
    """An image file that cannot be used; `str()` names the file, the reason and the fix."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class ImageInfo:
    """What the scan learns about a usable image (size is after EXIF rotation)."""

    path: str
    width: int
    height: int
    content_hash: str   # sha256 of the file bytes: identical files are duplicates, and caches key on it
    has_alpha: bool = False


def list_image_files(folder: str) -> tuple[list[str], list[str]]:
    """(image files, other files) directly in `folder`, sorted by name.

    Not recursive, so a class folder placed inside the instance folder is not picked up as instances.
    Hidden files (macOS `._name` forks, `.DS_Store`) and caption files are neither images nor "other".
    """
    images, others = [], []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(".") or not os.path.isfile(path):
            continue
        ext = os.path.splitext(name)[1].lower()
        if ext in IMAGE_EXTENSIONS:
            images.append(path)
        elif ext not in CAPTION_EXTENSIONS:
            others.append(path)
    return images, others


def file_content_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _open_checked(path: str):
    """Open lazily (header only) and refuse decompression bombs before any pixel is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # PIL warns above ~89 MP and raises above ~179 MP; our explicit check below decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError as e:
        raise BadImageError(path, f"refused: {e}. Resize it below {MAX_IMAGE_PIXELS // 1_000_000} megapixels") from None
    except UnidentifiedImageError:
        raise BadImageError(path, "not a readable image (wrong extension or corrupt header); "
                                  "remove it or re-save it as PNG/JPEG") from None
    except OSError as e:
        raise BadImageError(path, f"cannot open: {e}") from None
    w, h = im.size
    if w * h > MAX_IMAGE_PIXELS:
        im.close()
        raise BadImageError(path, f"refused: {w}x{h} is {w * h / 1e6:.0f} megapixels, over the "
                                  f"{MAX_IMAGE_PIXELS // 1_000_000} MP limit (a decompression bomb or a huge scan); "
                                  "resize it first")
    if w < 1 or h < 1:
        im.close()
        raise BadImageError(path, f"has an empty size {w}x{h}")
    return im


def _exif_transposed_size(im) -> tuple[int, int]:
    w, h = im.size
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block is not a reason to drop the photo
        orientation = 1
    if orientation in (5, 6, 7, 8):   # the transposing and 90-degree orientations swap width and height
        return h, w
    return w, h


def probe_image(path: str, *, full_decode: bool = True) -> ImageInfo:
    """Check that `path` is a usable image and return its size (after EXIF) and content hash.

    `full_decode` decodes every pixel (at reduced scale for JPEG, which still reads the whole stream), so
    a truncated or corrupt file is found now rather than hours into training.
    """
    from PIL import Image

    im = _open_checked(path)
    try:
        width, height = _exif_transposed_size(im)
        has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
        if full_decode:
            if im.format == "JPEG":
                im.draft("RGB", (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    im.load()
            except (OSError, SyntaxError, ValueError, EOFError) as e:
                raise BadImageError(path, f"corrupt or truncated ({e}); re-export or remove it") from None
    finally:
        im.close()
    return ImageInfo(path=path, width=width, height=height, content_hash=file_content_hash(path),
                     has_alpha=has_alpha)


def _to_rgb(im, background: tuple[int, int, int]):
    """Any PIL mode -> RGB: transparency composited on `background`, 16-bit scaled, CMYK converted."""
    from PIL import Image

    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit greyscale: PIL's convert("L") clips instead of scaling, so scale by hand.
        import numpy as np

        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "F":
        import numpy as np

        arr = np.asarray(im, dtype=np.float64)
        peak = 1.0 if arr.max() <= 1.0 else 255.0
        im = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode in ("LA", "La", "PA"):
        im = im.convert("RGBA")
    if im.mode == "RGBa":
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        base = Image.new("RGB", im.size, background)
        base.paste(im, mask=im.getchannel("A"))
        return base
    if im.mode != "RGB":
        im = im.convert("RGB")   # L, 1, CMYK (PIL inverts Adobe CMYK JPEGs itself), YCbCr, LAB, I;16 handled above
    return im


def load_image(path: str, background: tuple[int, int, int] = (255, 255, 255)):
    """Load `path` as an RGB PIL image, upright (EXIF orientation applied), transparency on `background`."""
    from PIL import Image, ImageOps

    source = _open_checked(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            source.load()
        try:
            upright = ImageOps.exif_transpose(source)
        except Exception:  # broken EXIF: keep the pixels as stored
            upright = source.copy()
        return _to_rgb(upright, background)
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImageError(path, f"corrupt or truncated ({e}); re-export or remove it") from None
    finally:
        source.close()


__all__ = ["IMAGE_EXTENSIONS", "CAPTION_EXTENSIONS", "MAX_IMAGE_PIXELS", "BadImageError", "ImageInfo",
           "list_image_files", "file_content_hash", "probe_image", "load_image"]
