"""The container probe: canvas and frame counts from blocks alone, on files Pillow writes
and on hand-built containers (hostile headers, truncation, garbage)."""

import io
import random
import struct
import zlib

import pytest
from PIL import Image

from tests.faults.hostile import junk_byte_gif, progressive_jpeg, scan_bomb_jpeg
from worker.ingest.probe import Probe, probe


def encode(frames: list[Image.Image], fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    if len(frames) > 1:
        kw.update(save_all=True, append_images=frames[1:], duration=40, loop=0)
    frames[0].save(buf, fmt, **kw)
    return buf.getvalue()


def colours(n: int, size=(40, 30)) -> list[Image.Image]:
    return [Image.new("RGB", size, (i * 20 % 256, 255 - i * 20 % 256, 90)) for i in range(n)]


# -- hand-built containers ------------------------------------------------------------


def gif(canvas: tuple[int, int], rects: list[tuple[int, int, int, int]], trailer: bool = True) -> bytes:
    """A GIF89a with a 2-colour global table and one image per rect (x, y, w, h); the image
    data is a fixed sub-block chain (the probe never decodes it)."""
    out = b"GIF89a" + struct.pack("<HHBBB", *canvas, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    out += b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"  # application extension (loop)
    for x, y, w, h in rects:
        out += b"\x21\xf9\x04\x04\x04\x00\x00\x00"  # graphic control extension
        out += (
            b"\x2c"
            + struct.pack("<HHHHB", x, y, w, h, 0)
            + b"\x02"
            + b"\x05"
            + b"\x84\x8f\xa9\xcb\xed"
            + b"\x00"
        )
    return out + (b";" if trailer else b"")


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def fctl(seq: int, w: int, h: int, x: int = 0, y: int = 0) -> bytes:
    return chunk(b"fcTL", struct.pack(">IIIIIHHBB", seq, w, h, x, y, 1, 10, 0, 0))


def png(w: int, h: int, *middle: bytes) -> bytes:
    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    idat = chunk(b"IDAT", zlib.compress(b"\x00" * 16))
    return b"\x89PNG\r\n\x1a\n" + ihdr + b"".join(middle) + idat + chunk(b"IEND", b"")


def riff(*chunks: tuple[bytes, bytes]) -> bytes:
    body = b"WEBP"
    for kind, data in chunks:
        body += kind + struct.pack("<I", len(data)) + data + (b"\x00" if len(data) % 2 else b"")
    return b"RIFF" + struct.pack("<I", len(body)) + body


def u24(v: int) -> bytes:
    return v.to_bytes(3, "little")


def vp8x(w: int, h: int, animated: bool) -> tuple[bytes, bytes]:
    return b"VP8X", bytes([0x02 if animated else 0]) + b"\x00\x00\x00" + u24(w - 1) + u24(h - 1)


def anmf(x: int, y: int, w: int, h: int) -> tuple[bytes, bytes]:
    return b"ANMF", u24(x // 2) + u24(y // 2) + u24(w - 1) + u24(h - 1) + u24(
        40
    ) + b"\x00" + b"VP8L\x00\x00\x00\x00"


# -- files Pillow writes ----------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animations_written_by_pillow(fmt):
    p = probe(encode(colours(7, (64, 48)), fmt))
    assert (p.format, p.width, p.height, p.frame_count, p.complete) == (fmt, 64, 48, 7, True)
    assert p.animated and p.canvas_pixels == 64 * 48


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "JPEG"])
def test_stills_written_by_pillow(fmt):
    p = probe(encode(colours(1, (321, 123)), fmt))
    assert (p.format, p.width, p.height, p.frame_count, p.animated) == (fmt, 321, 123, 1, False)


@pytest.mark.parametrize("lossless", [False, True])
def test_webp_stills_lossy_and_lossless(lossless):
    p = probe(encode(colours(1, (333, 77)), "WEBP", lossless=lossless))
    assert (p.format, p.width, p.height, p.frame_count) == ("WEBP", 333, 77, 1)


def test_jpeg_size_after_exif_and_in_progressive_mode():
    img = colours(1, (250, 90))[0]
    exif = Image.Exif()
    exif[0x010E] = "x" * 3000  # a large APP1 segment before the SOF
    assert probe(encode([img], "JPEG", exif=exif)).width == 250
    p = probe(encode([img], "JPEG", progressive=True))
    assert (p.width, p.height) == (250, 90)


def test_unknown_formats():
    for data in (b"", b"hello", encode(colours(1), "BMP"), encode(colours(1), "TIFF")):
        assert probe(data) == Probe(None, 0, 0, 1)


# -- hostile headers ------------------------------------------------------------------


def test_gif_frames_are_counted_without_decoding_and_grow_the_canvas():
    p = probe(gif((100, 100), [(0, 0, 10, 10)] * 120))
    assert (p.width, p.height, p.frame_count, p.complete) == (100, 100, 120, True)
    # Pillow enlarges the canvas for a frame that reaches past the logical screen.
    p = probe(gif((1, 1), [(0, 0, 1, 1), (60000, 10, 5000, 40000)]))
    assert (p.width, p.height, p.frame_count) == (65000, 40010, 2)


def test_apng_counts_frames_present_not_declared():
    declared = chunk(b"acTL", struct.pack(">II", 1_000_000_000, 0))
    frame_data = [chunk(b"fdAT", struct.pack(">I", k) + b"xx") for k in (2, 4)]
    data = png(64, 32, declared, fctl(0, 64, 32))
    data = data[:-12] + fctl(1, 16, 16) + frame_data[0] + fctl(3, 16, 16, 48, 16) + frame_data[1] + data[-12:]
    p = probe(data)
    assert (p.frame_count, p.declared_frames, p.width, p.height) == (3, 1_000_000_000, 64, 32)


def test_apng_default_image_outside_the_animation_is_a_frame_too():
    # acTL, then IDAT without a preceding fcTL (the default image), then one fcTL frame.
    data = png(20, 20, chunk(b"acTL", struct.pack(">II", 1, 0)))
    data = data[:-12] + fctl(0, 20, 20) + chunk(b"fdAT", b"\x00\x00\x00\x01zz") + data[-12:]
    assert probe(data).frame_count == 2


def test_png_still_and_a_frame_outside_the_canvas():
    assert probe(png(7, 9)) == Probe("PNG", 7, 9, 1)
    data = png(10, 10, chunk(b"acTL", struct.pack(">II", 1, 0)), fctl(0, 5000, 10, 0, 0))
    assert probe(data).width == 5000


def test_webp_riff_chunks():
    p = probe(riff(vp8x(4000, 3000, True), (b"ANIM", b"\x00" * 6), *[anmf(0, 0, 64, 64)] * 50))
    assert (p.format, p.width, p.height, p.frame_count, p.complete) == ("WEBP", 4000, 3000, 50, True)
    p = probe(riff(vp8x(16, 16, True), anmf(10_000, 0, 100, 100)))
    assert (p.width, p.height) == (10_100, 100)
    p = probe(riff(vp8x(640, 480, False), (b"VP8L", b"\x2f" + b"\x00" * 8)))
    assert (p.width, p.height, p.frame_count) == (640, 480, 1)


# -- damage -----------------------------------------------------------------------------


SAMPLES = {
    "gif": encode(colours(5), "GIF"),
    "apng": encode(colours(5), "PNG"),
    "webp_anim": encode(colours(5), "WEBP"),
    "webp_lossless": encode(colours(1), "WEBP", lossless=True),
    "jpeg": encode(colours(1), "JPEG"),
    "hand_gif": gif((50, 50), [(0, 0, 5, 5)] * 4),
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_truncation_is_reported_not_raised(name):
    data = SAMPLES[name]
    full = probe(data)
    for cut in range(len(data)):
        p = probe(data[:cut])
        # A prefix never claims more frames than the whole file, and says it is damaged
        # when it may have lost frames.
        assert p.frame_count <= max(full.frame_count, 1)
        # Everything before the trailer (GIF ";", PNG's 12-byte IEND chunk) is needed.
        if (p.format == "GIF" and cut < len(data) - 1) or (p.format == "PNG" and cut < len(data) - 12):
            assert not p.complete


def test_truncated_gif_counts_the_frames_it_saw():
    data = gif((50, 50), [(0, 0, 5, 5)] * 10, trailer=False)
    p = probe(data[:-3])
    assert (p.frame_count, p.complete) == (10, False)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_garbled_bytes_never_raise(name):
    rng = random.Random(name)
    data = bytearray(SAMPLES[name])
    for _ in range(300):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            mutated[rng.randrange(6, len(mutated))] = rng.randrange(256)
        p = probe(bytes(mutated))
        assert p.width >= 0 and p.height >= 0 and p.frame_count >= 0


@pytest.mark.parametrize("junk", [b"\x00", b"\x99\x00\x01", b"\xff" * 300])
def test_junk_between_gif_blocks_is_skipped_as_pillow_does(junk):
    """Pillow reads past bytes that are no block introducer; the frames after them are
    decoded, so they are counted (and budgeted), not hidden behind the junk."""
    first = gif((50, 50), [(0, 0, 5, 5)] * 3)
    data = first[:-1] + junk + gif((50, 50), [(0, 0, 5, 5)] * 3)[13:]
    p = probe(data)
    assert (p.frame_count, p.complete) == (6, True)
    assert p.frame_count == Image.open(io.BytesIO(data)).n_frames


def test_junk_byte_after_the_first_frame_of_a_real_gif():
    data = junk_byte_gif(frames=41)
    p = probe(data)
    assert p.frame_count == Image.open(io.BytesIO(data)).n_frames == 41
    assert len(p.spans) == 41


def test_webp_keyframes_cover_the_canvas_without_blending_alpha():
    vp8 = b"VP8 " + struct.pack("<I", 10) + b"\x00" * 10
    alph = b"ALPH" + struct.pack("<I", 2) + b"\x00\x00"

    def frame(x, w, flags, payload):
        return b"ANMF", u24(x // 2) + u24(0) + u24(w - 1) + u24(63) + u24(40) + bytes([flags]) + payload

    p = probe(
        riff(
            vp8x(64, 64, True),
            frame(0, 64, 0, vp8),  # 0
            frame(0, 64, 0, vp8),  # 1: opaque, covers the canvas
            frame(0, 64, 0, alph + vp8),  # 2: alpha blended onto the previous frame
            frame(0, 64, 0x02, alph + vp8),  # 3: alpha, but replaces the canvas
            frame(8, 56, 0x02, vp8),  # 4: does not cover the canvas
        )
    )
    assert p.frame_count == 5 and p.keyframes == (0, 1, 3)


def test_apng_keyframes_replace_the_whole_canvas():
    def frame(seq, w, blend):
        body = struct.pack(">IIIIIHHBB", seq, w, 16, 0, 0, 1, 10, 0, blend)
        return chunk(b"fcTL", body) + chunk(b"fdAT", struct.pack(">I", seq + 1) + b"zz")

    data = png(16, 16, chunk(b"acTL", struct.pack(">II", 4, 0)), fctl(0, 16, 16))
    data = data[:-12] + frame(1, 16, 0) + frame(3, 16, 1) + frame(5, 8, 0) + data[-12:]
    p = probe(data)
    assert p.frame_count == 4 and p.keyframes == (0, 1)  # 2 blends over, 3 is partial


# -- JPEG scans -----------------------------------------------------------------------


def test_jpeg_scans_and_process():
    baseline = encode([colours(1, (64, 48))[0]], "JPEG")
    p = probe(baseline)
    assert (p.scans, p.sequential, p.baseline_jpeg, p.complete) == (1, True, True, True)
    p = probe(progressive_jpeg())
    assert (p.scans, p.sequential, p.baseline_jpeg, p.complete) == (10, False, False, True)
    grey = probe(encode([colours(1, (64, 48))[0].convert("L")], "JPEG", progressive=True))
    assert (grey.scans, grey.baseline_jpeg) == (6, False)  # libjpeg's greyscale script
    assert not probe(b"GIF89a" + b"\x00" * 20).baseline_jpeg


def test_repeated_scans_are_each_counted():
    assert probe(scan_bomb_jpeg(64, 200)).scans == 210
    assert probe(scan_bomb_jpeg(64, 0)).scans == 10


def test_scan_count_matches_what_libjpeg_reads():
    """Up to the first EOI only (an MPO's second image is not decoded), across garbage
    before a marker (libjpeg skips it), and as a lower bound when truncated."""
    progressive = progressive_jpeg()
    assert probe(progressive + encode([colours(1)[0]], "JPEG", progressive=True)).scans == 10
    second = progressive.index(b"\xff\xda", progressive.index(b"\xff\xda") + 2)
    garbage = progressive[:second] + b"\x00\x01\x02" + progressive[second:]
    Image.open(io.BytesIO(garbage)).load()  # libjpeg decodes it (with a warning)
    assert probe(garbage).scans == 10
    cut = probe(progressive[: second + 20])
    assert (cut.scans, cut.complete, cut.baseline_jpeg) == (2, False, False)


def test_fill_bytes_before_a_marker_are_skipped_as_a_run():
    """Any number of FF fill bytes before a marker code, as libjpeg reads them; a file of
    nothing but FF after SOI is incomplete (one search, not a step per byte)."""
    progressive = progressive_jpeg()
    second = progressive.index(b"\xff\xda", progressive.index(b"\xff\xda") + 2)
    filled = progressive[:second] + b"\xff" * 100_000 + progressive[second:]
    Image.open(io.BytesIO(filled)).load()  # libjpeg decodes it
    assert probe(filled) == probe(progressive)
    assert probe(filled).scans == 10
    p = probe(b"\xff\xd8" + b"\xff" * 1_000_000)
    assert (p.format, p.complete, p.scans, p.baseline_jpeg) == ("JPEG", False, 0, False)


def test_garbled_jpeg_is_not_taken_for_baseline(monkeypatch):
    monkeypatch.setattr("worker.ingest.probe._jpeg", lambda data: 1 / 0)
    p = probe(encode([colours(1)[0]], "JPEG"))
    assert (p.format, p.complete, p.baseline_jpeg) == ("JPEG", False, False)
