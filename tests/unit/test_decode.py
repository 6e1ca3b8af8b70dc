import io
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from worker.decode import decode_image, to_rgb
from worker.errors import ErrorCode, ModerationError
from worker.samples import bomb_png, photo
from worker.settings import DecodeSettings

S = DecodeSettings()


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def code_of(data: bytes, settings: DecodeSettings = S) -> ErrorCode:
    with pytest.raises(ModerationError) as info:
        decode_image(data, settings, 224)
    return info.value.code


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_formats_decode_to_rgb_at_full_size(fmt):
    d = decode_image(encode(photo(300, 200, 1), fmt), S, 224)
    assert d.format == fmt and (d.width, d.height) == (300, 200) and d.frame_count == 1
    assert len(d.frames) == 1 and d.frames[0].image.mode == "RGB" and d.frames[0].image.size == (300, 200)
    assert d.frames[0].scale == 1.0


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (400, 200), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 50, 50))  # red marker top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    d = decode_image(encode(img, "JPEG", exif=exif, quality=95), S, 0)
    assert (d.width, d.height) == (200, 400)
    frame = d.frames[0].image
    assert frame.size == (200, 400)
    r, _, b = frame.getpixel((175, 25))  # the marker ends up top-right
    assert r > 200 and b < 60


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # fully transparent red
    rgba.paste((0, 0, 0, 255), (0, 0, 32, 64))
    frame = decode_image(encode(rgba, "PNG"), S, 0).frames[0].image
    assert frame.getpixel((48, 10)) == (255, 255, 255)
    assert frame.getpixel((10, 10)) == (0, 0, 0)
    la = Image.new("LA", (16, 16), (0, 0))
    assert decode_image(encode(la, "PNG"), S, 0).frames[0].image.getpixel((1, 1)) == (255, 255, 255)
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([0, 255, 0] * 256)
    pal.info["transparency"] = 0
    assert decode_image(encode(pal, "PNG", transparency=0), S, 0).frames[0].image.getpixel((1, 1)) == (
        255,
        255,
        255,
    )


def test_other_modes_become_sane_rgb():
    cmyk = decode_image(encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG"), S, 0).frames[0].image
    r, g, b = cmyk.getpixel((5, 5))
    assert r > 200 and g < 60 and b < 60  # cyan-less, full magenta+yellow = red
    i16 = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    assert decode_image(encode(i16, "PNG"), S, 0).frames[0].image.getpixel((0, 0)) == (255, 255, 255)
    bilevel = Image.new("1", (8, 8), 1)
    assert decode_image(encode(bilevel, "PNG"), S, 0).frames[0].image.getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("F", (4, 4), 1000.0)).getpixel((0, 0)) == (255, 255, 255)


def test_jpeg_draft_mode_stops_above_the_detector_size():
    data = encode(photo(4000, 3000, 2), "JPEG", quality=85)
    d = decode_image(data, DecodeSettings(draft_factor=1.0), 320)
    w, h = d.frames[0].image.size
    assert (d.width, d.height) == (4000, 3000)
    assert (w, h) == (500, 375)  # 1/8: the smallest DCT scale that keeps both sides >= 320
    assert decode_image(data, S, 320).frames[0].image.size == (1000, 750)  # 2x margin by default
    assert d.frames[0].scale == pytest.approx(w / 4000)
    full = decode_image(data, DecodeSettings(draft=False), 320)
    assert full.frames[0].image.size == (4000, 3000) and full.frames[0].scale == 1.0


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animations_are_sampled_evenly(fmt):
    frames = [Image.new("RGB", (64, 48), (i * 12, 255 - i * 12, 0)) for i in range(20)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)
    d = decode_image(data, DecodeSettings(max_frames=5), 0)
    assert d.frame_count == 20
    assert [f.index for f in d.frames] == [0, 5, 10, 14, 19]
    reds = [f.image.getpixel((3, 3))[0] for f in d.frames]
    assert reds == sorted(reds) and len(set(reds)) == 5


def test_empty_text_truncated_corrupt():
    jpeg = encode(photo(400, 300, 3), "JPEG")
    assert code_of(b"") == ErrorCode.EMPTY_OBJECT
    assert code_of(b"hello, this is text") == ErrorCode.UNSUPPORTED_FORMAT
    assert code_of(b"%PDF-1.7\n...") == ErrorCode.UNSUPPORTED_FORMAT
    assert code_of(jpeg[: len(jpeg) // 2]) == ErrorCode.CORRUPT_IMAGE
    assert code_of(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4) == ErrorCode.CORRUPT_IMAGE
    png = encode(photo(100, 100, 4), "PNG")
    assert code_of(png[:60] + b"\x00" * 50 + png[110:]) == ErrorCode.CORRUPT_IMAGE


def test_unsupported_pillow_format_is_named():
    ico = encode(Image.new("RGB", (16, 16)), "ICO")
    with pytest.raises(ModerationError) as info:
        decode_image(ico, S, 0)
    assert info.value.code == ErrorCode.UNSUPPORTED_FORMAT and "ICO" in info.value.message


def test_decompression_bomb_is_refused_without_allocating():
    data = bomb_png(40_000)
    tracemalloc.start()
    try:
        assert code_of(data) == ErrorCode.IMAGE_TOO_LARGE
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50 * 1024 * 1024


def test_pixel_limit_is_exact():
    data = encode(Image.new("RGB", (100, 50)), "PNG")
    assert decode_image(data, DecodeSettings(max_pixels=5000), 0).frames
    assert code_of(data, DecodeSettings(max_pixels=4999)) == ErrorCode.IMAGE_TOO_LARGE
