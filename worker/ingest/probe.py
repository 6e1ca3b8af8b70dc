"""Container probe: format, canvas size, frame count and JPEG scan count of an image,
read from its blocks without decompressing a single pixel.

The decode budget (``worker.ingest.decode.check_budget``) is checked from what this returns,
so a decompression bomb is refused before any decoder runs. GIF blocks (logical screen,
image descriptors; data sub-blocks are skipped by their lengths), PNG/APNG chunks
(IHDR, acTL, fcTL), WebP RIFF chunks (VP8, VP8L, VP8X, ANMF) and JPEG markers (SOF, and
each SOS up to EOI: a repeated progressive scan is refused by its count) are walked,
skipping what the decoders skip (junk bytes between GIF blocks, garbage before a JPEG
marker), so the counts are what Pillow will decode. Pillow's ``n_frames`` is not an
option: it walks a GIF in Python, one read per junk byte.

A truncated or garbled container never raises: the probe reports what it could read
and sets ``complete=False``; the decoder then reports the damage with its own code.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers: C0–CF except DHT (C4), JPG (C8) and DAC (CC).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Sequential Huffman frames: SOF0 (baseline) and SOF1 (extended). The others are
# progressive, lossless or arithmetic-coded.
_JPEG_SEQUENTIAL = frozenset({0xC0, 0xC1})
# JPEG markers without a length field.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
# A marker in entropy-coded data: FF followed by anything but a stuffed 00, a fill FF or a
# restart marker (D0–D7), which all belong to the scan.
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
# The first byte that is no fill byte (FF): a run of them is skipped in one search.
_JPEG_NOT_FILL = re.compile(rb"[^\xff]")
# GIF block introducers: extension, image descriptor, trailer.
_GIF_BLOCK = re.compile(rb"[!,;]")


@dataclass(frozen=True)
class Probe:
    """What the container says about itself."""

    format: str | None  # "GIF", "PNG", "WEBP", "JPEG"; None when not one of those
    width: int  # canvas: every frame is composited onto (at most) this many pixels
    height: int
    frame_count: int  # frames actually present in the container (>= 1 when known)
    declared_frames: int | None = None  # what an animation header claims (APNG acTL)
    complete: bool = True  # False: truncated or garbled; counts are a lower bound
    # GIF only: where the header ends, each frame's byte span (its extensions, descriptor
    # and data), and the frames that decode on their own (they cover the canvas and have
    # no transparent colour), from which sampling may start instead of from frame 0.
    header_end: int = field(default=0, repr=False, compare=False)
    spans: tuple[tuple[int, int], ...] = field(default=(), repr=False, compare=False)
    keyframes: tuple[int, ...] = field(default=(0,), repr=False, compare=False)
    # JPEG only: start-of-scan segments before the first EOI (the decode budget's
    # max_jpeg_scans: libjpeg decodes every one of them over the whole image), and whether
    # the frame is sequential Huffman (SOF0/SOF1) rather than progressive or another process.
    scans: int = 0
    sequential: bool = True

    @property
    def baseline_jpeg(self) -> bool:
        """A JPEG whose decode is bounded by its pixels: one sequential scan. Only these
        decode on threads; progressive and multi-scan JPEGs go to the decode processes,
        whose hard time limit holds during a decoder call."""
        return self.format == "JPEG" and self.sequential and self.scans <= 1

    @property
    def canvas_pixels(self) -> int:
        return self.width * self.height

    @property
    def animated(self) -> bool:
        return self.frame_count > 1


UNKNOWN = Probe(None, 0, 0, 1)


def probe(data: bytes) -> Probe:
    """Probe ``data``; formats the probe does not know give ``format=None``."""
    if data[:6] in (b"GIF87a", b"GIF89a"):
        fmt, walk = "GIF", _gif
    elif data[:8] == _PNG_SIGNATURE:
        fmt, walk = "PNG", _png
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        fmt, walk = "WEBP", _webp
    elif data[:3] == b"\xff\xd8\xff":
        fmt, walk = "JPEG", _jpeg
    else:
        return UNKNOWN
    try:
        return walk(data)
    except Exception:
        # Every read is bounds-checked; this is the net under that, for garbled input. A
        # JPEG read no further is not known to be baseline: it goes to a decode process.
        return Probe(fmt, 0, 0, 1, complete=False, sequential=fmt != "JPEG")


def _gif(data: bytes) -> Probe:
    n = len(data)
    if n < 13:
        return Probe("GIF", 0, 0, 0, complete=False)
    screen_w, screen_h, packed = struct.unpack_from("<HHB", data, 6)
    width, height = screen_w, screen_h
    pos = 13
    if packed & 0x80:
        pos += 3 << ((packed & 7) + 1)
    header_end = start = pos
    spans: list[tuple[int, int]] = []
    keyframes = [0]
    transparent = False  # the pending graphic control extension names a transparent colour
    complete = False
    while pos < n:
        introducer = data[pos]
        if introducer == 0x3B:  # trailer
            complete = True
            break
        if introducer == 0x21:  # extension: label, then data sub-blocks
            if pos + 3 < n and data[pos + 1] == 0xF9 and data[pos + 2] >= 1:
                transparent = bool(data[pos + 3] & 0x01)
            pos = _skip_sub_blocks(data, pos + 2)
        elif introducer == 0x2C:  # image descriptor
            if pos + 10 > n:
                break
            x, y, w, h, flags = struct.unpack_from("<HHHHB", data, pos + 1)
            # Pillow grows the canvas to hold a frame that reaches past the logical screen.
            width, height = max(width, x + w), max(height, y + h)
            if spans and not transparent and (x, y, w, h) == (0, 0, screen_w, screen_h):
                keyframes.append(len(spans))
            pos += 10
            if flags & 0x80:
                pos += 3 << ((flags & 7) + 1)
            pos = _skip_sub_blocks(data, pos + 1)  # +1: LZW minimum code size
            if pos < 0:
                spans.append((start, n))  # truncated inside its data: still a frame to Pillow
                break
            spans.append((start, pos))
            start, transparent = pos, False
        else:
            # Not a block introducer: Pillow skips such bytes one by one and reads on, so
            # the frames after them are decoded and must be counted (and budgeted).
            found = _GIF_BLOCK.search(data, pos + 1)
            if found is None:
                break
            pos = found.start()
            continue
        if pos < 0:
            break
    if (width, height) != (screen_w, screen_h):
        keyframes = [0]  # the canvas grows: a frame covering the screen does not cover it
    return Probe(
        "GIF",
        width,
        height,
        len(spans),
        complete=complete,
        header_end=header_end,
        spans=tuple(spans),
        keyframes=tuple(keyframes),
    )


def _skip_sub_blocks(data: bytes, pos: int) -> int:
    """Position after a chain of data sub-blocks ending in a zero-length one; -1 if the
    data ends first."""
    n = len(data)
    while pos < n:
        size = data[pos]
        pos += 1 + size
        if size == 0:
            return pos
    return -1


def _png(data: bytes) -> Probe:
    n = len(data)
    pos = 8
    width = height = 0
    canvas = (0, 0)
    declared: int | None = None
    starts: list[int] = []  # offset of each fcTL chunk
    covers: list[bool] = []  # the frame replaces the whole canvas (keyframe)
    default_is_frame = False  # the IDAT image is the first animation frame (fcTL before it)
    seen_idat = False
    end = n
    complete = False
    while pos + 8 <= n:
        length, kind = struct.unpack_from(">I4s", data, pos)
        body = pos + 8
        if body + length > n:
            break
        if kind == b"IHDR" and length >= 8:
            width, height = struct.unpack_from(">II", data, body)
            canvas = (width, height)
        elif kind == b"acTL" and length >= 8:
            declared = struct.unpack_from(">I", data, body)[0]
        elif kind == b"fcTL" and length >= 26:
            starts.append(pos)
            if not seen_idat:
                default_is_frame = True
            w, h, x, y = struct.unpack_from(">IIII", data, body + 4)
            # blend_op 0 (source): the frame's pixels replace the canvas's, alpha included.
            covers.append((x, y, w, h) == (0, 0, *canvas) and data[body + 25] == 0)
            width, height = max(width, x + w), max(height, y + h)
        elif kind == b"IDAT":
            seen_idat = True
        elif kind == b"IEND":
            end, complete = pos, True
            break
        pos = body + length + 4  # + CRC
    if declared is None:
        return Probe("PNG", width, height, 1, complete=complete)
    # Pillow counts acTL's number plus a default image that is not an animation frame; the
    # frames that can actually be decoded are the fcTL chunks present.
    frames = len(starts) + (0 if default_is_frame else 1)
    spans: tuple[tuple[int, int], ...] = ()
    keyframes = [0]
    if default_is_frame and starts and (width, height) == canvas:
        spans = tuple(zip(starts, [*starts[1:], end], strict=True))
        keyframes += [i for i in range(1, len(starts)) if covers[i]]
    return Probe(
        "PNG",
        width,
        height,
        max(1, frames),
        declared_frames=declared,
        complete=complete,
        header_end=starts[0] if spans else 0,
        spans=spans,
        keyframes=tuple(keyframes),
    )


def _webp(data: bytes) -> Probe:
    n = len(data)
    pos = 12
    width = height = 0
    canvas = (0, 0)
    animated = False
    still: tuple[int, int] | None = None
    spans: list[tuple[int, int]] = []
    keyframes = [0]
    while pos + 8 <= n:
        kind, length = struct.unpack_from("<4sI", data, pos)
        body = pos + 8
        if body + length > n:
            # A truncated last chunk still names the canvas of a simple lossy/lossless file.
            if still is None and kind in (b"VP8 ", b"VP8L"):
                still = _webp_bitstream_size(kind, data[body:])
            break
        end = body + length + (length & 1)  # chunks are padded to an even size
        if kind == b"VP8X" and length >= 10:
            animated = bool(data[body] & 0x02)
            width = 1 + int.from_bytes(data[body + 4 : body + 7], "little")
            height = 1 + int.from_bytes(data[body + 7 : body + 10], "little")
            canvas = (width, height)
        elif kind == b"ANMF" and length >= 16:
            x = 2 * int.from_bytes(data[body : body + 3], "little")
            y = 2 * int.from_bytes(data[body + 3 : body + 6], "little")
            w = 1 + int.from_bytes(data[body + 6 : body + 9], "little")
            h = 1 + int.from_bytes(data[body + 9 : body + 12], "little")
            no_blend = bool(data[body + 15] & 0x02)
            opaque = not _webp_frame_has_alpha(data[body + 16 : body + length])
            if spans and (x, y, w, h) == (0, 0, *canvas) and (no_blend or opaque):
                keyframes.append(len(spans))
            spans.append((pos, min(end, n)))
            width, height = max(width, x + w), max(height, y + h)
        elif kind in (b"VP8 ", b"VP8L") and still is None:
            still = _webp_bitstream_size(kind, data[body : body + length])
        pos = end
    complete = pos >= n
    if animated:
        if not spans or (width, height) != canvas:
            keyframes = [0]
        return Probe(
            "WEBP",
            width,
            height,
            max(len(spans), 1),
            complete=complete,
            header_end=spans[0][0] if spans else 0,
            spans=tuple(spans),
            keyframes=tuple(keyframes),
        )
    if still is not None and width == 0:
        width, height = still
    return Probe("WEBP", width, height, 1, complete=complete and (width > 0))


def _webp_frame_has_alpha(payload: bytes) -> bool:
    """Whether an ANMF frame's bitstream carries alpha (an ALPH chunk, or VP8L's flag)."""
    pos = 0
    while pos + 8 <= len(payload):
        kind, length = struct.unpack_from("<4sI", payload, pos)
        if kind == b"ALPH":
            return True
        if kind == b"VP8L":
            head = payload[pos + 8 : pos + 13]
            return len(head) < 5 or bool((int.from_bytes(head[1:5], "little") >> 28) & 1)
        if kind == b"VP8 ":
            return False
        pos += 8 + length + (length & 1)
    return True  # unknown: assume the worst (not a keyframe)


def _webp_bitstream_size(kind: bytes, payload: bytes) -> tuple[int, int] | None:
    if kind == b"VP8 " and len(payload) >= 10 and payload[3:6] == b"\x9d\x01\x2a":
        w, h = struct.unpack_from("<HH", payload, 6)
        return w & 0x3FFF, h & 0x3FFF
    if kind == b"VP8L" and len(payload) >= 5 and payload[0] == 0x2F:
        bits = int.from_bytes(payload[1:5], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    return None


def _jpeg(data: bytes) -> Probe:
    """The first frame header's size and the scans up to the first EOI (what libjpeg
    decodes; an MPO's later images and trailing bytes are never decoded). Each scan's
    entropy-coded data is skipped by searching for the next marker, in C (~2 ms/MB)."""
    n = len(data)
    pos = 2
    width = height = 0
    sof: int | None = None
    components = 0
    scans = 0
    while pos + 2 <= n:
        if data[pos] != 0xFF:
            # libjpeg skips bytes before a marker too (with a warning), so must the count.
            found = _JPEG_MARKER.search(data, pos)
            if found is None:
                break
            pos = found.start()
            continue
        marker = data[pos + 1]
        if marker == 0xFF:  # fill bytes: skipped up to the last FF before the marker code
            found = _JPEG_NOT_FILL.search(data, pos + 1)
            if found is None:
                break
            pos = found.start() - 1
            continue
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        if marker == 0xD9:  # EOI: the decoder stops here
            return _jpeg_probe(width, height, sof, scans, complete=sof is not None)
        if pos + 4 > n:
            break
        length = struct.unpack_from(">H", data, pos + 2)[0]
        if length < 2:
            break
        if marker in _JPEG_SOF and sof is None and length >= 7 and pos + 9 <= n:
            height, width = struct.unpack_from(">HH", data, pos + 5)
            sof = marker
            components = data[pos + 9] if pos + 10 <= n else 0
        if marker == 0xDA:
            if sof is None:
                break  # a scan before any frame header: libjpeg refuses the file
            scans += 1
            if scans == 1 and sof in _JPEG_SEQUENTIAL and pos + 4 < n and data[pos + 4] == components:
                # One sequential scan of every component: libjpeg reads no further scan (a
                # second SOS is an error there), so its entropy data need not be walked.
                return _jpeg_probe(width, height, sof, scans, complete=True)
            found = _JPEG_MARKER.search(data, pos + 2 + length)
            if found is None:
                break  # the entropy-coded data runs to the end: truncated
            pos = found.start()
            continue
        pos += 2 + length
    return _jpeg_probe(width, height, sof, scans, complete=False)


def _jpeg_probe(width: int, height: int, sof: int | None, scans: int, complete: bool) -> Probe:
    return Probe(
        "JPEG",
        width,
        height,
        1,
        complete=complete,
        scans=scans,
        sequential=sof in _JPEG_SEQUENTIAL,
    )
