"""Decode stage: bytes → RGB frames the detectors can score, safely.

The pixel count is checked from the header before any pixel is allocated; JPEGs are
decoded with DCT scaling ("draft" mode) down to just above the largest input any enabled
detector needs; EXIF orientation is applied; every mode becomes RGB with transparency
composited on white; animations are sampled to at most ``max_frames`` frames.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError, features

from worker.errors import ErrorCode, ModerationError
from worker.settings import DecodeSettings

_BASE_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"})


def _optional_formats() -> frozenset[str]:
    extra: set[str] = set()
    try:
        import pillow_heif

        pillow_heif.register_heif_opener()
        extra.add("HEIF")
        if hasattr(pillow_heif, "register_avif_opener"):
            pillow_heif.register_avif_opener()
            extra.add("AVIF")
    except ImportError:
        pass
    if features.check("avif"):
        extra.add("AVIF")
    return frozenset(extra)


SUPPORTED_FORMATS: frozenset[str] = _BASE_FORMATS | _optional_formats()

# Our explicit check against settings is the bomb guard; Pillow's own warning (issued
# between its limit and twice it) would only be noise. Its hard error above twice its
# limit is kept and mapped to image_too_large.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# Signatures of formats we decode: bytes that start like one of them but that Pillow
# cannot identify are a damaged image, not an unsupported format.
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "La", "RGBa"})
_WHITE = (255, 255, 255)


@dataclass(frozen=True)
class Frame:
    image: Image.Image  # RGB, EXIF-oriented, possibly reduced by draft mode
    scale: float  # decoded width / original width; 1.0 unless draft mode reduced it
    index: int = 0  # frame index in the source file


@dataclass(frozen=True)
class DecodedImage:
    frames: list[Frame]
    format: str
    width: int  # original size, after EXIF orientation
    height: int
    frame_count: int  # frames in the file (>= len(frames))


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB. Transparent pixels become white, as a viewer sees them on
    a page, rather than whatever colour hides under alpha 0."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        if mode.startswith("I;16"):
            arr = arr / 256.0
        else:
            peak = float(arr.max()) if arr.size else 0.0
            if peak > 255.0:
                arr = arr * (255.0 / peak)
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")


def _sample_indices(frame_count: int, max_frames: int) -> list[int]:
    if frame_count <= max_frames:
        return list(range(frame_count))
    if max_frames == 1:
        return [0]
    step = (frame_count - 1) / (max_frames - 1)
    return sorted({round(i * step) for i in range(max_frames)})


def _oriented_size(im: Image.Image) -> tuple[int, int]:
    orientation = im.getexif().get(0x0112, 1) if hasattr(im, "getexif") else 1
    w, h = im.size
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def decode_image(data: bytes, settings: DecodeSettings, min_side: int) -> DecodedImage:
    """Decode ``data``; raise ModerationError with a code for anything that is not a sane image."""
    if not data:
        raise ModerationError(ErrorCode.EMPTY_OBJECT, "the object is empty (0 bytes)")
    try:
        return _decode(data, settings, min_side)
    except ModerationError:
        raise
    except MemoryError:
        raise ModerationError(ErrorCode.IMAGE_TOO_LARGE, "ran out of memory decoding the image") from None
    except Image.DecompressionBombError as exc:
        raise ModerationError(ErrorCode.IMAGE_TOO_LARGE, str(exc)) from None
    except Exception as exc:
        # A hostile file can make any decoder raise anything; it must not crash the worker.
        raise ModerationError(
            ErrorCode.CORRUPT_IMAGE, f"cannot decode image: {type(exc).__name__}: {exc}"
        ) from None


def _decode(data: bytes, settings: DecodeSettings, min_side: int) -> DecodedImage:
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        if data.startswith(_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
            raise ModerationError(
                ErrorCode.CORRUPT_IMAGE, "damaged image: the header is unreadable"
            ) from None
        raise ModerationError(ErrorCode.UNSUPPORTED_FORMAT, "not a recognised image format") from None
    fmt = im.format or "unknown"
    if fmt not in SUPPORTED_FORMATS:
        raise ModerationError(ErrorCode.UNSUPPORTED_FORMAT, f"image format {fmt} is not supported")
    # Only the header has been read so far: check the pixel budget before allocating.
    w0, h0 = im.size
    if w0 * h0 > settings.max_pixels:
        raise ModerationError(
            ErrorCode.IMAGE_TOO_LARGE,
            f"{w0}x{h0} = {w0 * h0} pixels exceeds the limit of {settings.max_pixels}",
        )
    if w0 == 0 or h0 == 0:
        raise ModerationError(ErrorCode.CORRUPT_IMAGE, f"image has zero size {w0}x{h0}")
    width, height = _oriented_size(im)
    frame_count = max(1, int(getattr(im, "n_frames", 1)))

    # An MPO's second frame is a camera preview or the other stereo eye, not an animation.
    if frame_count == 1 or fmt == "MPO":
        if settings.draft and min_side > 0 and fmt in ("JPEG", "MPO"):
            target = math.ceil(min_side * settings.draft_factor)
            im.draft("RGB", (target, target))
        im.load()
        oriented = ImageOps.exif_transpose(im)
        rgb = to_rgb(oriented)
        return DecodedImage([Frame(rgb, rgb.width / width)], fmt, width, height, frame_count)

    frames: list[Frame] = []
    for index in _sample_indices(frame_count, settings.max_frames):
        im.seek(index)
        if im.size[0] * im.size[1] > settings.max_pixels:
            raise ModerationError(ErrorCode.IMAGE_TOO_LARGE, f"frame {index} is {im.size[0]}x{im.size[1]}")
        # RGBA first: GIF/APNG frames are composited onto previous ones and may carry alpha.
        frame = im.convert("RGBA") if im.mode in ("P", "PA", "LA", "L", "RGBA") else im.copy()
        frame = to_rgb(ImageOps.exif_transpose(frame))
        frames.append(Frame(frame, frame.width / width, index))
    return DecodedImage(frames, fmt, width, height, frame_count)
