"""Image loading that survives real folders: odd modes, EXIF, 16-bit, CMYK, broken files, bombs, duplicates."""
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from comfyui_dreambooth.training.data.images import (MAX_IMAGE_PIXELS, BadImageError, list_image_files,
                                                      load_image, probe_image)
from comfyui_dreambooth.training.data.scan import scan_folder


def _png_with_size(path, width, height):
    """A tiny PNG file whose header claims width x height (a decompression bomb's header)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _half_red_half_blue(w=40, h=20):
    im = Image.new("RGB", (w, h), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, w // 2, h))
    return im


def test_exif_rotated_jpeg_is_loaded_upright(tmp_path):
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6          # stored sideways: display needs a 90° clockwise turn
    _half_red_half_blue().save(path, quality=95, exif=exif.tobytes())
    info = probe_image(str(path))
    assert (info.width, info.height) == (20, 40)
    im = load_image(str(path))
    assert im.mode == "RGB" and im.size == (20, 40)
    top, bottom = np.asarray(im)[2, 10], np.asarray(im)[37, 10]
    assert top[0] > 200 and top[2] < 60       # the stored left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_composited_on_the_background(tmp_path, mode):
    path = tmp_path / f"t_{mode}.png"
    if mode == "RGBA":
        im = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    elif mode == "LA":
        im = Image.new("LA", (8, 8), (0, 0))
    else:
        im = Image.new("P", (8, 8), 0)
        im.putpalette([255, 0, 0] + [0, 0, 0] * 255)
        im.info["transparency"] = 0
    im.save(path)
    assert probe_image(str(path)).has_alpha
    px = np.asarray(load_image(str(path), background=(0, 128, 255)))[4, 4]
    assert tuple(px) == (0, 128, 255)


def test_half_transparent_pixel_is_blended(tmp_path):
    path = tmp_path / "half.png"
    Image.new("RGBA", (4, 4), (255, 255, 255, 128)).save(path)
    px = np.asarray(load_image(str(path), background=(0, 0, 0)))[0, 0]
    assert 120 <= px[0] <= 136


def test_grayscale_16bit_and_1bit(tmp_path):
    g16 = tmp_path / "g16.png"
    arr = np.full((6, 6), 65535, dtype=np.uint16)
    arr[0, 0] = 0
    Image.fromarray(arr).save(g16)
    im = load_image(str(g16))
    assert im.mode == "RGB"
    a = np.asarray(im)
    assert tuple(a[1, 1]) == (255, 255, 255) and tuple(a[0, 0]) == (0, 0, 0)   # scaled, not clipped
    mid = tmp_path / "g16mid.png"
    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(mid)
    assert 125 <= np.asarray(load_image(str(mid)))[0, 0, 0] <= 130

    gray = tmp_path / "gray.jpg"
    Image.new("L", (8, 8), 200).save(gray)
    assert abs(int(np.asarray(load_image(str(gray)))[0, 0, 1]) - 200) <= 2

    bw = tmp_path / "bw.bmp"
    Image.new("1", (8, 8), 1).save(bw)
    assert tuple(np.asarray(load_image(str(bw)))[0, 0]) == (255, 255, 255)


def test_rgb48_tiff_and_cmyk_jpeg(tmp_path):
    cmyk = tmp_path / "print.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(cmyk, quality=95)   # pure red in CMYK
    r, g, b = np.asarray(load_image(str(cmyk)))[8, 8]
    assert r > 200 and g < 60 and b < 60

    tif = tmp_path / "scan.tif"
    Image.new("RGB", (10, 6), (10, 200, 30)).save(tif)
    assert tuple(np.asarray(load_image(str(tif)))[3, 3]) == (10, 200, 30)


@pytest.mark.parametrize("fmt,ext", [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp"), ("BMP", "bmp"),
                                     ("TIFF", "tiff")])
def test_every_listed_format_loads(tmp_path, fmt, ext):
    path = tmp_path / f"img.{ext}"
    Image.new("RGB", (24, 16), (50, 100, 150)).save(path, format=fmt)
    info = probe_image(str(path))
    assert (info.width, info.height) == (24, 16)
    assert load_image(str(path)).size == (24, 16)


def test_truncated_and_fake_images_are_reported_with_their_path(tmp_path):
    buf = io.BytesIO()
    Image.effect_noise((256, 256), 64).convert("RGB").save(buf, format="JPEG", quality=95)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(BadImageError) as e:
        probe_image(str(cut))
    assert str(cut) in str(e.value) and "truncated" in str(e.value)
    with pytest.raises(BadImageError):
        load_image(str(cut))

    buf = io.BytesIO()
    Image.effect_noise((128, 128), 64).convert("RGB").save(buf, format="PNG")
    cut_png = tmp_path / "cut.png"
    cut_png.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(BadImageError):
        probe_image(str(cut_png))

    fake = tmp_path / "notes.png"
    fake.write_text("this is a text file with an image name")
    with pytest.raises(BadImageError) as e:
        probe_image(str(fake))
    assert str(fake) in str(e.value) and "not a readable image" in str(e.value)


@pytest.mark.parametrize("side", [12_000, 60_000])   # over our limit only / over PIL's own hard limit too
def test_decompression_bomb_is_refused_before_decoding(tmp_path, side):
    bomb = tmp_path / "bomb.png"
    _png_with_size(bomb, side, side)
    assert bomb.stat().st_size < 1000
    for fn in (probe_image, load_image):
        with pytest.raises(BadImageError) as e:
            fn(str(bomb))
        assert "refused" in str(e.value) and str(bomb) in str(e.value)
        assert f"{MAX_IMAGE_PIXELS // 1_000_000}" in str(e.value)


def test_listing_ignores_non_images_and_hidden_files(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.JPG")
    (tmp_path / "a.txt").write_text("caption")
    (tmp_path / "readme.md").write_text("x")
    (tmp_path / "._b.png").write_bytes(b"\x00\x05\x16\x07")   # macOS resource fork
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "sub" / "c.png")
    images, others = list_image_files(str(tmp_path))
    assert [p.rsplit("/", 1)[1] for p in images] == ["a.JPG", "b.png"]
    assert [p.rsplit("/", 1)[1] for p in others] == ["readme.md"]


def test_scan_reports_duplicates_bad_files_and_keeps_the_first_copy(tmp_path):
    Image.new("RGB", (16, 16), (1, 2, 3)).save(tmp_path / "01.png")
    (tmp_path / "02.png").write_bytes((tmp_path / "01.png").read_bytes())
    (tmp_path / "03.png").write_bytes((tmp_path / "01.png").read_bytes())
    Image.new("RGB", (16, 16), (9, 9, 9)).save(tmp_path / "04.png")
    (tmp_path / "05.png").write_text("nope")
    (tmp_path / "list.csv").write_text("a,b")
    scan = scan_folder(str(tmp_path), lambda p: ("cap", "filename", ""))
    assert [img.path.rsplit("/", 1)[1] for img in scan.images] == ["01.png", "04.png"]
    assert [[p.rsplit("/", 1)[1] for p in g] for g in scan.duplicates] == [["01.png", "02.png", "03.png"]]
    assert [p.rsplit("/", 1)[1] for p, _ in scan.bad] == ["05.png"]
    assert [p.rsplit("/", 1)[1] for p in scan.ignored] == ["list.csv"]
