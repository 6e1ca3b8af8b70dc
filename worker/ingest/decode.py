"""Decode stage: bytes → RGB frames the detectors can score, safely.

The decode budget (``check_budget``: canvas pixels, JPEG scans, frames, frames × canvas)
is checked from the container's blocks (``worker.ingest.probe``) before any decoder runs; JPEGs are
decoded with DCT scaling ("draft" mode) down to just above the largest input any enabled
detector needs; EXIF orientation is applied (and kept on the frame, for the PDQ of the
file as stored); every mode becomes RGB with transparency composited on white; animations
are sampled to at most ``max_frames`` frames, within a wall-clock budget checked between
frames.
"""

from __future__ import annotations

import bisect
import io
import math
import struct
import time
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError, features

from modgate.errors import ErrorCode, ModerationError
from modgate.settings import DecodeSettings
from worker.ingest.probe import Probe, probe

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
# 16-bit and float modes are converted this many pixels at a time, so the temporary
# arrays stay a few MB instead of 8 bytes per pixel of the whole image (float64).
_BAND_PIXELS = 1 << 20
# Formats whose frame count the probe reads from the container. For the others Pillow's
# n_frames reads headers only (TIFF IFDs, HEIF items); on a GIF it would decode every frame.
_PROBED = frozenset({"GIF", "PNG", "WEBP"})


@dataclass(frozen=True)
class Frame:
    image: Image.Image  # RGB, EXIF-oriented, possibly reduced by draft mode
    scale: float  # decoded width / original width; 1.0 unless draft mode reduced it
    index: int = 0  # frame index in the source file
    # The EXIF orientation ``image`` was turned by (1 = as stored): the hashing stage
    # derives the file's own PDQ (ThreatExchange's) from it (``hashing.pdq_file_hash``).
    orientation: int = 1


@dataclass(frozen=True)
class DecodedImage:
    frames: list[Frame]
    format: str
    width: int  # original size, after EXIF orientation
    height: int
    frame_count: int  # frames in the file (>= len(frames))


def check_budget(info: Probe, settings: DecodeSettings) -> None:
    """The decode budget, from the container's header, frame count and JPEG scan count;
    every decode path (Pillow here, the tensor path) calls it before decoding. Over budget is an error
    verdict, never a verdict from the frames that fit: unsafe frames can follow harmless ones."""
    w, h = info.width, info.height
    if w * h > settings.max_pixels:
        raise ModerationError(
            ErrorCode.IMAGE_TOO_LARGE,
            f"{w}x{h} = {w * h} pixels exceeds the limit of {settings.max_pixels}",
        )
    if info.scans > settings.max_jpeg_scans:
        # libjpeg decodes every scan over the whole image, and no wall clock can stop a
        # decoder call on a thread: a repeated scan is refused before it starts.
        raise ModerationError(
            ErrorCode.IMAGE_TOO_COMPLEX,
            f"{info.scans} JPEG scans exceeds the limit of {settings.max_jpeg_scans}",
        )
    if info.frame_count > settings.max_decode_frames:
        raise ModerationError(
            ErrorCode.IMAGE_TOO_COMPLEX,
            f"{info.frame_count} frames exceeds the limit of {settings.max_decode_frames}",
        )
    # Animations decode sequentially (each frame is composited onto the previous one)
    # from frame 0 or from a keyframe, up to each sampled frame.
    plan = decode_plan(info.frame_count, settings.max_frames, info.keyframes)
    frames = sum(indices[-1] - start + 1 for start, indices in plan)
    decoded = frames * w * h
    if decoded > settings.max_decode_pixels:
        raise ModerationError(
            ErrorCode.IMAGE_TOO_COMPLEX,
            f"{frames} frames of {w}x{h} = {decoded} pixels to decode exceeds the "
            f"budget of {settings.max_decode_pixels}",
        )


def decode_plan(
    frame_count: int, max_frames: int, keyframes: Sequence[int] = (0,)
) -> list[tuple[int, list[int]]]:
    """The sampled frames, grouped by the frame decoding starts from: the nearest keyframe
    at or before them, unless carrying on from the previous sampled frame is no dearer.
    Without keyframes (beyond frame 0) that is one run from frame 0 to the last frame."""
    plan: list[tuple[int, list[int]]] = []
    keys = sorted(set(keyframes) | {0})
    last = -1
    for index in _sample_indices(frame_count, max_frames):
        start = keys[bisect.bisect_right(keys, index) - 1]
        if plan and start <= last:
            plan[-1][1].append(index)
        else:
            plan.append((start, [index]))
        last = index
    return plan


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
        return Image.fromarray(_high_depth_to_l(im), "L").convert("RGB")
    return im.convert("RGB")


def _bands(im: Image.Image) -> Iterator[tuple[int, int, np.ndarray]]:
    w, h = im.size
    rows = max(1, _BAND_PIXELS // max(w, 1))
    for y in range(0, h, rows):
        y1 = min(h, y + rows)
        yield y, y1, np.asarray(im.crop((0, y, w, y1)))


def _high_depth_to_l(im: Image.Image) -> np.ndarray:
    """16-bit (I;16*: top byte) and 32-bit int/float (I, F: scaled to the peak when it
    exceeds 255, clipped at 0) to 8-bit grey, band by band."""
    w, h = im.size
    out = np.empty((h, w), dtype=np.uint8)
    if im.mode.startswith("I;16"):
        for y, y1, band in _bands(im):
            out[y:y1] = band >> 8
        return out
    peak = 0.0
    for _, _, band in _bands(im):
        if band.size:
            finite = np.nan_to_num(band, nan=0.0, posinf=0.0, neginf=0.0) if im.mode == "F" else band
            peak = max(peak, float(finite.max()))
    scale = np.float32(255.0 / peak) if peak > 255.0 else np.float32(1.0)
    for y, y1, band in _bands(im):
        f = band.astype(np.float32)
        f *= scale
        np.nan_to_num(f, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
        np.clip(f, 0.0, 255.0, out=f)
        out[y:y1] = f
    return out


def _sample_indices(frame_count: int, max_frames: int) -> list[int]:
    if frame_count <= max_frames:
        return list(range(frame_count))
    if max_frames == 1:
        return [0]
    step = (frame_count - 1) / (max_frames - 1)
    return sorted({round(i * step) for i in range(max_frames)})


def exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation Pillow's ``ImageOps.exif_transpose`` applies to ``im``: 1–8,
    1 for none and for any value it ignores."""
    orientation = im.getexif().get(0x0112, 1) if hasattr(im, "getexif") else 1
    return int(orientation) if orientation in range(2, 9) else 1


def _oriented(im: Image.Image) -> tuple[Image.Image, int]:
    """``im`` as displayed, and the orientation that turned it."""
    orientation = exif_orientation(im)
    return ImageOps.exif_transpose(im), orientation


def _oriented_size(im: Image.Image) -> tuple[int, int]:
    w, h = im.size
    return (h, w) if exif_orientation(im) in (5, 6, 7, 8) else (w, h)


def decode_image(
    data: bytes, settings: DecodeSettings, min_side: int, info: Probe | None = None
) -> DecodedImage:
    """Decode ``data``; raise ModerationError with a code for anything that is not a sane
    image or that is over the decode budget. ``info``: the probe, when the caller has it."""
    if not data:
        raise ModerationError(ErrorCode.EMPTY_OBJECT, "the object is empty (0 bytes)")
    started = time.monotonic()
    try:
        return _decode(data, settings, min_side, info if info is not None else probe(data), started)
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


def _decode(
    data: bytes, settings: DecodeSettings, min_side: int, info: Probe, started: float
) -> DecodedImage:
    if info.format is not None:
        # From the container's blocks alone: a bomb is refused before any decoder runs.
        check_budget(info, settings)
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
    # Only the header has been read so far: check the budget again with what Pillow saw
    # (formats the probe does not walk; a canvas Pillow reads larger than the probe did).
    w0, h0 = im.size
    if fmt in ("JPEG", "MPO"):
        frame_count = 1  # an MPO's other frames are previews / the other eye: never decoded
    elif fmt == "GIF":
        frame_count = max(1, info.frame_count)
    elif fmt in _PROBED and info.format == fmt:
        # Pillow counts what the header declares (APNG acTL); only frames present decode.
        frame_count = max(1, min(info.frame_count, int(getattr(im, "n_frames", 1))))
    else:
        frame_count = max(1, int(getattr(im, "n_frames", 1)))
    keyframes = info.keyframes if fmt in _KEYED and info.format == fmt else (0,)
    seen = Probe(fmt, max(w0, info.width), max(h0, info.height), frame_count, keyframes=keyframes)
    check_budget(seen, settings)
    if w0 == 0 or h0 == 0:
        raise ModerationError(ErrorCode.CORRUPT_IMAGE, f"image has zero size {w0}x{h0}")
    width, height = _oriented_size(im)

    # An MPO's second frame is a camera preview or the other stereo eye, not an animation.
    if frame_count == 1 or fmt == "MPO":
        if settings.draft and min_side > 0 and fmt in ("JPEG", "MPO"):
            target = math.ceil(min_side * settings.draft_factor)
            im.draft("RGB", (target, target))
        im.load()
        oriented, orientation = _oriented(im)
        rgb = to_rgb(oriented)
        return DecodedImage([Frame(rgb, rgb.width / width, 0, orientation)], fmt, width, height, frame_count)

    frames: list[Frame] = []
    keyed = fmt in _KEYED and info.format == fmt and len(info.spans) == frame_count
    plan = decode_plan(frame_count, settings.max_frames, keyframes if keyed else (0,))
    for start, indices in plan:
        source = im if start == 0 else _KEYED[fmt](data, info, start, indices[-1])
        for index in indices:
            _check_clock(started, settings, index, frame_count)
            source.seek(index - start)
            frames.append(_animation_frame(source, index, width, settings))
    _check_clock(started, settings, frame_count, frame_count)
    return DecodedImage(frames, fmt, width, height, frame_count)


def _gif_from(data: bytes, info: Probe, start: int, last: int) -> Image.Image:
    """Frames start..last of a GIF as a GIF of their own: frame ``start`` is a keyframe
    (it covers the canvas opaquely), so nothing before it changes what they show."""
    blocks = data[info.spans[start][0] : info.spans[last][1]]
    return Image.open(io.BytesIO(data[: info.header_end] + blocks + b";"))


def _apng_from(data: bytes, info: Probe, start: int, last: int) -> Image.Image:
    """Frames start..last of an APNG as an APNG of its own, frame ``start`` (a keyframe:
    it replaces the whole canvas) becoming the default image; sequence numbers and CRCs
    are rewritten, as Pillow checks both."""
    out = [data[:8]]
    for kind, body in _png_chunks(data, 8, info.header_end):
        if kind == b"acTL":
            body = struct.pack(">II", last - start + 1, 0)
        out.append(_png_chunk(kind, body))
    seq = 0
    first = True
    for kind, body in _png_chunks(data, info.spans[start][0], info.spans[last][1]):
        if kind == b"fcTL":
            first = seq == 0
            body = struct.pack(">I", seq) + body[4:]
            seq += 1
        elif kind == b"fdAT" and first:
            kind, body = b"IDAT", body[4:]
        elif kind == b"fdAT":
            body = struct.pack(">I", seq) + body[4:]
            seq += 1
        out.append(_png_chunk(kind, body))
    out.append(_png_chunk(b"IEND", b""))
    return Image.open(io.BytesIO(b"".join(out)))


def _png_chunks(data: bytes, pos: int, end: int) -> Iterator[tuple[bytes, bytes]]:
    while pos + 12 <= end:
        length, kind = struct.unpack_from(">I4s", data, pos)
        yield kind, data[pos + 8 : pos + 8 + length]
        pos += 12 + length


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _webp_from(data: bytes, info: Probe, start: int, last: int) -> Image.Image:
    """Frames start..last of an animated WebP as a WebP of their own (frame ``start``
    covers the canvas and does not blend with what was under it)."""
    head = bytearray(data[12 : info.header_end])  # VP8X (first, by the spec), ICCP, ANIM
    if head[:4] == b"VP8X":
        head[8] &= ~0x0C  # EXIF / XMP flags: those chunks (after the frames) are left out
    body = b"WEBP" + bytes(head) + data[info.spans[start][0] : info.spans[last][1]]
    return Image.open(io.BytesIO(b"RIFF" + struct.pack("<I", len(body)) + body))


# Formats whose sampling may start at a keyframe: the file of frames start..last.
_KEYED: dict[str, Callable[[bytes, Probe, int, int], Image.Image]] = {
    "GIF": _gif_from,
    "PNG": _apng_from,
    "WEBP": _webp_from,
}


def _animation_frame(im: Image.Image, index: int, width: int, settings: DecodeSettings) -> Frame:
    if im.size[0] * im.size[1] > settings.max_pixels:
        raise ModerationError(ErrorCode.IMAGE_TOO_LARGE, f"frame {index} is {im.size[0]}x{im.size[1]}")
    # RGBA first: GIF/APNG frames are composited onto previous ones and may carry alpha.
    frame = im.convert("RGBA") if im.mode in ("P", "PA", "LA", "L", "RGBA") else im.copy()
    oriented, orientation = _oriented(frame)
    frame = to_rgb(oriented)
    return Frame(frame, frame.width / width, index, orientation)


def _check_clock(started: float, settings: DecodeSettings, index: int, frame_count: int) -> None:
    """The wall-clock budget, checked between frames (a decoder call cannot be
    interrupted in a thread; the process pool's hard limit covers that)."""
    spent = time.monotonic() - started
    if spent > settings.max_decode_s:
        raise ModerationError(
            ErrorCode.IMAGE_TOO_COMPLEX,
            f"decoding took over {settings.max_decode_s:g} s (at frame {index} of {frame_count})",
        )
