"""The decode processes' memory cap (decode.process_memory_mb): an image that needs more
address space than the cap costs that image a coded error, and the pool works on.
Progressive JPEGs (which the pipeline sends here) decode to the same pixels as in-thread.
Hangs, crashes and kills are in test_decode.py."""

from __future__ import annotations

import io
import os
import struct
import zlib

import pytest
from PIL import Image

from modgate.errors import ErrorCode, ModerationError
from modgate.settings import DecodeSettings
from tests.faults.hostile import progressive_jpeg, scan_bomb_jpeg
from worker.detectors.open_nsfw import prepare_frame
from worker.ingest.decode import decode_image
from worker.ingest.decode_pool import DecodeProcesses
from worker.ingest.probe import probe

# 7000×7000 RGB: PIL holds it at 4 bytes a pixel, 196 MB before any conversion.
SIDE = 7000
# Above the child's idle size, far below what the big PNG needs.
CAP_MB = 64
# Only the memory cap may stop the big PNG: time and pixel budgets are out of its way.
BUDGET = {"max_decode_s": 120.0, "max_pixels": 100_000_000}


def big_png(side: int = SIDE) -> bytes:
    """A real, fully decodable side×side black RGB PNG (a few hundred KB)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + 3 * side)  # filter byte + pixels
    body = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def small_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (120, 90), (200, 30, 40)).save(buf, "PNG")
    return buf.getvalue()


def pool(memory_mb: int) -> DecodeProcesses:
    settings = DecodeSettings(process_memory_mb=memory_mb, **BUDGET)
    return DecodeProcesses(1, settings, 224, {"open_nsfw": prepare_frame}, False)


@pytest.fixture
def capped():
    procs = pool(CAP_MB)
    yield procs
    procs.close()


def test_an_image_over_the_memory_cap_costs_one_image_and_its_process(capped):
    data = small_png()
    assert capped.run(data, probe(data)).frame_count == 1  # the cap leaves room to work
    (before,) = capped.pids()
    big = big_png()
    with pytest.raises(ModerationError) as info:
        capped.run(big, probe(big))
    assert info.value.code == ErrorCode.IMAGE_TOO_LARGE
    assert "decode.process_memory_mb" in info.value.message
    with pytest.raises(ProcessLookupError):
        os.kill(before, 0)  # retired and reaped
    out = capped.run(data, probe(data))  # a fresh process, under the same cap
    assert (out.format, out.width, out.height) == ("PNG", 120, 90)
    assert capped.pids() != [before]


def test_without_the_cap_the_same_image_decodes():
    """The control: only the cap stopped the big PNG above."""
    procs = pool(0)
    try:
        big = big_png()
        out = procs.run(big, probe(big))
        assert (out.format, out.width, out.height) == ("PNG", SIDE, SIDE)
    finally:
        procs.close()


@pytest.mark.parametrize("kind", ["progressive", "many scans under the budget"])
def test_progressive_jpeg_decodes_in_a_decode_process_to_the_same_pixels(kind):
    data = progressive_jpeg(160, seed=3) if kind == "progressive" else scan_bomb_jpeg(96, 50)
    info = probe(data)
    assert not info.baseline_jpeg  # what sends it to a decode process
    settings = DecodeSettings()
    procs = DecodeProcesses(1, settings, 0, {}, keep_frames=True)
    try:
        out = procs.run(data, info)
    finally:
        procs.close()
    (frame,) = out.frames
    assert (out.format, out.width, out.height, out.frame_count) == (
        "JPEG",
        *Image.open(io.BytesIO(data)).size,
        1,
    )
    here = decode_image(data, settings, 0).frames[0].image
    reference = Image.open(io.BytesIO(data)).convert("RGB")  # Pillow's own decode
    assert frame.frame.image.tobytes() == here.tobytes() == reference.tobytes()
