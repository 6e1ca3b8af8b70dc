"""Hostile inputs for the fault suite, built in well under a second each: a decode-bomb
GIF (many full frames on a huge canvas, small on disk), 16-bit giant PNGs, truncated files,
a progressive-JPEG scan bomb (one AC scan repeated), a GIF with a junk byte between frames."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def _gif_frame_data(side: int) -> bytes:
    """The LZW image data (min code size byte, sub-blocks, terminator) of one side×side
    frame of palette index 0, taken from a GIF Pillow wrote: encoded once, reused for every
    frame, since each frame gets its own colour table anyway."""
    buf = io.BytesIO()
    Image.new("P", (side, side), 0).save(buf, "GIF")
    data = buf.getvalue()
    pos = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)  # header + global table
    while data[pos] == 0x21:  # extension blocks before the image descriptor
        pos += 2
        while data[pos]:
            pos += data[pos] + 1
        pos += 1
    assert data[pos] == 0x2C, "expected an image descriptor"
    flags = data[pos + 9]
    pos += 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    start = pos
    pos += 1  # LZW minimum code size
    while data[pos]:
        pos += data[pos] + 1
    return data[start : pos + 1]


def bomb_gif(frames: int = 120, side: int = 4000, keyframes: bool = True) -> bytes:
    """``frames`` full side×side frames, each a different colour: ~1.5 MB at the defaults,
    1.9 G decoded pixels when every frame is decoded. With ``keyframes`` each frame replaces
    the whole canvas, so a sampled frame decodes on its own (cheap: modgate seeks to them);
    without, every frame declares a transparent colour, so each one composites over the one
    before and a late frame can only be had by decoding every frame before it."""
    lzw = _gif_frame_data(side)
    out = [b"GIF89a", struct.pack("<HHBBB", side, side, 0x80, 0, 0), b"\x00\x00\x00\xff\xff\xff"]
    out.append(b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00")  # loop forever
    for i in range(frames):
        # 50 ms, disposal: leave in place; transparent colour 1 (unused) unless keyframes.
        out.append(b"\x21\xf9\x04" + (b"\x04" if keyframes else b"\x05") + b"\x05\x00\x01\x00")
        # Image descriptor with a local 2-colour table whose index 0 changes per frame.
        out.append(b"\x2c" + struct.pack("<HHHH", 0, 0, side, side) + b"\x80")
        out.append(bytes([(37 * i) % 256, (91 * i) % 256, (173 * i) % 256]) + b"\x00\x00\x00")
        out.append(lzw)
    out.append(b"\x3b")
    return b"".join(out)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def giant_png16(width: int, height: int, color: bool = False) -> bytes:
    """A valid 16-bit PNG (grey, or RGB with ``color``) of width×height: a gradient row
    repeated, so it is small on disk but every pixel is real when decoded."""
    channels = 3 if color else 1
    row = bytearray(b"\x00")  # filter: none
    for x in range(width):
        value = (x * 65535 // max(1, width - 1)).to_bytes(2, "big")
        row += value * channels
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(bytes(row)) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 2 if color else 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def truncated(data: bytes, keep: float = 0.4) -> bytes:
    """The first ``keep`` of a file: the header parses, the pixels run out."""
    return data[: max(64, int(len(data) * keep))]


def _jpeg_segments(data: bytes) -> list[bytes]:
    """A JPEG cut into its marker segments, each start-of-scan segment together with its
    entropy-coded data (up to the next marker that is not a restart marker or a stuffed FF)."""
    out, pos = [data[:2]], 2
    while pos < len(data):
        marker = data[pos + 1]
        if marker == 0xD9:
            out.append(data[pos:])
            break
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA:
            while not (data[end] == 0xFF and data[end + 1] not in (0x00, 0xFF, *range(0xD0, 0xD8))):
                end += 1
        out.append(data[pos:end])
        pos = end
    return out


def scan_bomb_jpeg(side: int = 256, repeats: int = 200) -> bytes:
    """A progressive side×side JPEG whose second scan (luma AC 1–5) is repeated
    ``repeats`` extra times: every copy is a valid scan that libjpeg decodes again over the
    whole image, while on disk it is a few dozen bytes (a flat image's AC bands are
    end-of-band runs). 8000² with 6,000 repeats is ~0.8 MB and the issue's 27 s decode."""
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (90, 140, 200)).save(buf, "JPEG", quality=90, progressive=True)
    segments = _jpeg_segments(buf.getvalue())
    scans = [i for i, seg in enumerate(segments) if seg[1] == 0xDA]
    second = scans[1]
    return b"".join([*segments[: second + 1], *[segments[second]] * repeats, *segments[second + 1 :]])


def progressive_jpeg(side: int = 96, seed: int = 0) -> bytes:
    """An ordinary progressive JPEG (libjpeg's standard script: 10 scans) of a photo-like image."""
    from worker.tools.samples import photo

    buf = io.BytesIO()
    photo(side, side, seed).save(buf, "JPEG", quality=85, progressive=True)
    return buf.getvalue()


def junk_byte_gif(frames: int = 41, side: int = 32, unsafe_from: int = 1) -> bytes:
    """An animated GIF with one junk byte (0x00, not a block introducer) after frame 0.
    Pillow skips it and decodes every frame; a probe that stops there sees one frame.
    Frames before ``unsafe_from`` are plain white, the others a photo-like image, so a
    verdict judged on frame 0 alone differs from one judged on the real frames."""
    from worker.tools.samples import photo

    images = [
        Image.new("RGB", (side, side), "white") if i < unsafe_from else photo(side, side, i)
        for i in range(frames)
    ]
    buf = io.BytesIO()
    images[0].save(buf, "GIF", save_all=True, append_images=images[1:], duration=50, loop=0)
    data = buf.getvalue()
    # The end of frame 0: the second graphic control extension (Pillow writes one per frame).
    second = data.index(b"\x21\xf9\x04", data.index(b"\x2c"))
    return data[:second] + b"\x00" + data[second:]
