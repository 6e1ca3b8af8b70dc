import dataclasses
import io
import os
import signal
import struct
import time
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from modgate.errors import ErrorCode, ModerationError
from modgate.settings import DecodeSettings
from tests.faults.hostile import junk_byte_gif, progressive_jpeg, scan_bomb_jpeg
from worker.detectors.open_nsfw import preprocess as open_nsfw_preprocess
from worker.ingest.decode import check_budget, decode_image, decode_plan, to_rgb
from worker.ingest.decode_pool import DecodeProcesses, decode_and_prepare
from worker.ingest.probe import Probe, probe
from worker.tools.samples import bomb_png, photo

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


# -- decode budget (issue 10) ----------------------------------------------------------


def bomb_gif(frames: int = 120, side: int = 4000, tile: int = 64) -> bytes:
    """The decode bomb: ``frames`` small palette frames on a side×side canvas. Pillow
    writes one tile; its image block is repeated at offsets under a big logical screen
    (Pillow itself takes seconds to write 120 frames of 16 Mpx)."""
    img = Image.new("P", (tile, tile), 1)
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])
    small = encode(img, "GIF")
    packed = small[10]
    start = 13 + ((3 << ((packed & 7) + 1)) if packed & 0x80 else 0)
    image = small[small.index(b"\x2c", start) : -1]  # descriptor + data, no trailer
    head = small[:6] + struct.pack("<HH", side, side) + small[10:start]
    body = b"".join(
        b"\x2c" + struct.pack("<HH", (i * 97) % (side - tile), (i * 53) % (side - tile)) + image[5:]
        for i in range(frames)
    )
    return head + body + b";"


def animation(n: int, size=(64, 48), fmt="GIF") -> bytes:
    frames = [Image.new("RGB", size, (i * 12 % 256, 0, 0)) for i in range(n)]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=40, loop=0)


def refused_before_any_decoder(monkeypatch, data: bytes) -> ModerationError:
    """The error ``decode_image`` raises for ``data`` with every decoder made to fail."""

    def no_decoder(*args, **kwargs):
        raise AssertionError("a decoder was opened")

    monkeypatch.setattr("worker.ingest.decode.Image.open", no_decoder)
    with pytest.raises(ModerationError) as info:
        decode_image(data, S, 224)
    return info.value


def test_bomb_gif_is_too_complex_from_its_blocks_alone(monkeypatch):
    data = bomb_gif()
    assert Image.open(io.BytesIO(data)).size == (4000, 4000)  # a valid GIF Pillow would decode
    error = refused_before_any_decoder(monkeypatch, data)
    assert error.code == ErrorCode.IMAGE_TOO_COMPLEX
    assert "120 frames of 4000x4000" in error.message


def test_the_same_canvas_with_few_frames_is_within_budget():
    d = decode_image(bomb_gif(frames=2), DecodeSettings(max_frames=2), 0)
    assert d.frame_count == 2 and [f.index for f in d.frames] == [0, 1]
    assert d.frames[1].image.size == (4000, 4000)


def test_budget_function_limits_are_exact():
    s = DecodeSettings(max_pixels=100, max_decode_frames=10, max_decode_pixels=400)

    def code(p: Probe) -> ErrorCode | None:
        try:
            check_budget(p, s)
        except ModerationError as exc:
            return exc.code
        return None

    assert code(Probe("GIF", 10, 10, 4)) is None  # 400 decoded pixels: at the budget
    assert code(Probe("GIF", 10, 10, 5)) == ErrorCode.IMAGE_TOO_COMPLEX  # 500 > 400
    assert code(Probe("GIF", 1, 1, 10)) is None
    assert code(Probe("GIF", 1, 1, 11)) == ErrorCode.IMAGE_TOO_COMPLEX  # frame cap
    assert code(Probe("PNG", 101, 1, 1)) == ErrorCode.IMAGE_TOO_LARGE  # one frame over max_pixels


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_over_budget_is_an_error_never_a_prefix_of_frames(fmt):
    data = animation(20, fmt=fmt)
    assert decode_image(data, DecodeSettings(max_decode_frames=20), 0).frame_count == 20
    assert code_of(data, DecodeSettings(max_decode_frames=19)) == ErrorCode.IMAGE_TOO_COMPLEX
    # Frames decoded: from frame 0 (or a keyframe) up to each of the 8 sampled frames.
    frames = sum(ix[-1] - start + 1 for start, ix in decode_plan(20, 8, probe(data).keyframes))
    assert decode_image(data, DecodeSettings(max_decode_pixels=frames * 64 * 48), 0).frame_count == 20
    assert (
        code_of(data, DecodeSettings(max_decode_pixels=frames * 64 * 48 - 1)) == ErrorCode.IMAGE_TOO_COMPLEX
    )


def test_formats_the_probe_does_not_walk_are_budgeted_from_pillow_headers():
    pages = [Image.new("RGB", (30, 20), (i, 0, 0)) for i in range(6)]
    tiff = encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    assert decode_image(tiff, S, 0).frame_count == 6
    assert code_of(tiff, DecodeSettings(max_decode_frames=5)) == ErrorCode.IMAGE_TOO_COMPLEX


def test_jpeg_scan_bomb_is_too_complex_before_any_decoder_runs(monkeypatch):
    bomb = scan_bomb_jpeg(64, 200)  # 210 scans
    assert Image.open(io.BytesIO(bomb)).load() is not None  # a valid JPEG Pillow would decode
    error = refused_before_any_decoder(monkeypatch, bomb)
    assert error.code == ErrorCode.IMAGE_TOO_COMPLEX
    assert "210 JPEG scans exceeds the limit of 100" in error.message


def test_jpeg_scan_limit_is_the_setting_and_exact():
    bomb = scan_bomb_jpeg(64, 200)
    assert code_of(bomb, DecodeSettings(max_jpeg_scans=209)) == ErrorCode.IMAGE_TOO_COMPLEX
    decoded = decode_image(bomb, DecodeSettings(max_jpeg_scans=210), 0)
    reference = Image.open(io.BytesIO(bomb)).convert("RGB")
    assert np.array_equal(np.asarray(decoded.frames[0].image), np.asarray(reference))
    # an ordinary progressive JPEG (10 scans) is far inside the default
    assert decode_image(progressive_jpeg(), S, 0).frames[0].image.size == (96, 96)


def test_junk_byte_gif_is_judged_on_all_its_frames():
    """A 0x00 after frame 0 hid the other 40 frames from the probe, and the decode sampled
    frame 0 alone; Pillow skips the byte, so every frame counts and is sampled."""
    data = junk_byte_gif(frames=41)
    d = decode_image(data, S, 0)
    assert d.frame_count == 41 and [f.index for f in d.frames] == [0, 6, 11, 17, 23, 29, 34, 40]
    white = np.full((32, 32, 3), 255, np.uint8)
    assert np.array_equal(np.asarray(d.frames[0].image), white)
    assert not np.array_equal(np.asarray(d.frames[-1].image), white)  # the later content
    # and the frames after the junk are budgeted
    assert code_of(data, DecodeSettings(max_decode_frames=40)) == ErrorCode.IMAGE_TOO_COMPLEX


def test_wall_clock_budget_is_checked_between_frames(monkeypatch):
    clock = iter(range(0, 10_000, 4))  # every reading is 4 s after the previous one
    monkeypatch.setattr("worker.ingest.decode.time.monotonic", lambda: next(clock))
    with pytest.raises(ModerationError) as info:
        decode_image(animation(6), DecodeSettings(max_decode_s=10.0), 0)
    assert info.value.code == ErrorCode.IMAGE_TOO_COMPLEX and "10 s" in info.value.message
    # A generous budget on the same clock passes.
    assert decode_image(animation(6), DecodeSettings(max_decode_s=1000.0), 0).frame_count == 6


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16_bit_conversion_keeps_the_top_byte_without_float64(mode):
    side = 2000
    values = (
        (np.arange(side * side, dtype=np.uint32) * 2654435761 % 65536).astype(np.uint16).reshape(side, side)
    )
    im = Image.frombytes(mode, (side, side), values.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    tracemalloc.start()
    try:
        rgb = to_rgb(im)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # float64 of the whole image is 8 bytes a pixel (the old path peaked at ~16); the
    # result itself is 1 byte a pixel (grey), plus bands of a few MB.
    assert peak < 3 * side * side
    got = np.asarray(rgb)
    assert rgb.mode == "RGB" and (got[..., 0] == (values >> 8)).all() and (got[..., 0] == got[..., 2]).all()


def test_32_bit_modes_scale_to_their_peak_and_survive_nan():
    i32 = Image.fromarray(np.array([[0, 500, 1000, -5]], dtype=np.int32), "I")
    assert [p[0] for p in np.asarray(to_rgb(i32))[0]] == [0, 127, 255, 0]
    f = Image.fromarray(np.array([[np.nan, 10.0, 300.0, np.inf]], dtype=np.float32), "F")
    assert [p[0] for p in np.asarray(to_rgb(f))[0]] == [0, 8, 255, 255]
    small = Image.fromarray(np.array([[0.0, 100.0, 255.0]], dtype=np.float32), "F")
    assert [p[0] for p in np.asarray(to_rgb(small))[0]] == [0, 100, 255]


# -- decode processes -------------------------------------------------------------------


def misbehaving_job(data, info, *args):
    """Runs in the decode process: b"hang" never returns, b"crash" kills the process,
    anything else decodes as in production."""
    if data == b"hang":
        time.sleep(3600)
    if data == b"crash":
        os._exit(3)
    return decode_and_prepare(data, info, *args)


@pytest.fixture
def procs():
    from worker.detectors.open_nsfw import prepare_frame

    pool = DecodeProcesses(
        1, DecodeSettings(max_decode_s=0.5), 0, {"open_nsfw": prepare_frame}, False, job=misbehaving_job
    )
    yield pool
    pool.close()


def png_bytes() -> bytes:
    return encode(photo(120, 90, 5), "PNG")


def test_decode_process_sends_back_detector_inputs_not_frames(procs):
    data = png_bytes()
    out = procs.run(data, probe(data))
    assert (out.format, out.width, out.height, out.frame_count) == ("PNG", 120, 90, 1)
    (frame,) = out.frames
    assert frame.frame is None and frame.inputs["open_nsfw"].shape == (224, 224, 3)
    expected = open_nsfw_preprocess(decode_image(data, S, 0).frames[0].image)
    assert np.array_equal(frame.inputs["open_nsfw"], expected)


def test_a_hanging_decode_is_killed_and_its_process_replaced(procs):
    (before,) = procs.pids()
    with pytest.raises(ModerationError) as info:
        procs.run(b"hang", probe(b"hang"))
    assert info.value.code == ErrorCode.IMAGE_TOO_COMPLEX
    with pytest.raises(ProcessLookupError):
        os.kill(before, 0)  # killed and reaped
    data = png_bytes()
    assert procs.run(data, probe(data)).frame_count == 1  # the pool works on
    assert procs.pids() != [before]


def test_a_crashing_decoder_costs_one_image(procs):
    with pytest.raises(ModerationError) as info:
        procs.run(b"crash", probe(b"crash"))
    assert info.value.code == ErrorCode.CORRUPT_IMAGE and "exit code 3" in info.value.message
    data = png_bytes()
    assert procs.run(data, probe(data)).frame_count == 1


def test_a_process_killed_while_idle_is_replaced_without_failing_an_image(procs):
    data = png_bytes()
    procs.run(data, probe(data))
    (pid,) = procs.pids()
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)  # let the kernel deliver it; correctness does not depend on the wait
    assert procs.run(data, probe(data)).frame_count == 1


def test_errors_in_the_process_keep_their_codes(procs):
    assert_codes = {b"hello": ErrorCode.UNSUPPORTED_FORMAT, bomb_gif(): ErrorCode.IMAGE_TOO_COMPLEX}
    for data, code in assert_codes.items():
        with pytest.raises(ModerationError) as info:
            procs.run(data, probe(data))
        assert info.value.code == code


# -- sampling from keyframes -------------------------------------------------------------


def keyframe_gif(frames: int, side: int) -> tuple[bytes, list[tuple[int, int, int]]]:
    """``frames`` opaque frames that each cover the side×side canvas in one colour of its
    own (a local colour table): every frame is a keyframe. Pillow encodes one frame; its
    block is repeated with a different table each time."""
    small = encode(Image.new("P", (side, side), 0), "GIF")
    packed = small[10]
    start = 13 + ((3 << ((packed & 7) + 1)) if packed & 0x80 else 0)
    at = small.index(b"\x2c", start)
    descriptor, data = small[at : at + 9], small[at + 10 : -1]
    colours = [(i % 256, (i * 7) % 256, 255 - i % 256) for i in range(frames)]
    body = b"".join(descriptor + b"\x80" + bytes(c) + b"\x00\x00\x00" + data for c in colours)
    return small[:start] + body + b";", colours


def count_gif_frames_decoded(monkeypatch) -> list[int]:
    from PIL import GifImagePlugin

    calls = [0]
    real = GifImagePlugin.GifImageFile._seek

    def counting(self, frame, update_image=True):
        calls[0] += update_image
        return real(self, frame, update_image)

    monkeypatch.setattr(GifImagePlugin.GifImageFile, "_seek", counting)
    return calls


def test_sampling_a_long_gif_decodes_from_keyframes_not_from_frame_0(monkeypatch):
    data, colours = keyframe_gif(300, 2000)
    info = probe(data)
    assert info.frame_count == 300 and info.keyframes == tuple(range(300))
    s = DecodeSettings(max_frames=8)
    plan = decode_plan(300, 8, info.keyframes)
    assert [start for start, _ in plan] == [idx for _, (idx,) in plan]  # each sampled frame on its own
    decoded = count_gif_frames_decoded(monkeypatch)
    d = decode_image(data, s, 0)
    assert decoded[0] <= 8 + 1  # not 300
    assert [f.image.getpixel((1000, 1000)) for f in d.frames] == [colours[f.index] for f in d.frames]
    assert [f.index for f in d.frames] == [0, 43, 85, 128, 171, 214, 256, 299]
    # Without its keyframes the same file is 300 frames × 4 Mpx to decode: over the budget.
    sequential = dataclasses.replace(info, keyframes=(0,))
    with pytest.raises(ModerationError) as err:
        decode_image(data, s, 0, sequential)
    assert err.value.code == ErrorCode.IMAGE_TOO_COMPLEX


@pytest.mark.parametrize(
    ("fmt", "mode"),
    [("GIF", "RGB"), ("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "P"), ("WEBP", "RGB"), ("WEBP", "RGBA")],
)
def test_keyframe_sampling_shows_what_a_sequential_decode_shows(fmt, mode):
    frames = [photo(120, 90, k) for k in range(12)]
    for k in (2, 5, 6, 9):  # frames that change a corner only: not keyframes
        frames[k] = frames[k - 1].copy()
        frames[k].paste((k * 20, 0, 0), (10, 10, 40, 40))
    frames = [f.convert(mode) for f in frames]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=40, loop=0)
    info = probe(data)
    assert 0 < len(info.keyframes) - 1 < 11 and 5 not in info.keyframes and 6 not in info.keyframes
    s = DecodeSettings(max_frames=5)
    plan = decode_plan(12, 5, info.keyframes)
    assert any(
        len(ix) > 1 or ix[-1] > start for start, ix in plan
    )  # frame 6 decodes from a keyframe before it
    assert sum(ix[-1] - start + 1 for start, ix in plan) < 12
    keyed = decode_image(data, s, 0)
    sequential = decode_image(data, s, 0, dataclasses.replace(info, keyframes=(0,)))
    assert [f.index for f in keyed.frames] == [f.index for f in sequential.frames] == [0, 3, 6, 8, 11]
    for a, b in zip(keyed.frames, sequential.frames, strict=True):
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_transparent_or_partial_frames_are_not_keyframes():
    frames = [Image.new("RGB", (40, 30), (i * 20, 0, 0)) for i in range(4)]
    partial = [f.copy() for f in frames]
    for i, f in enumerate(partial[1:], 1):
        f.paste((0, 255, 0), (0, 0, 5 + i, 5))  # only a corner changes: Pillow writes that box
    data = encode(partial[0], "GIF", save_all=True, append_images=partial[1:], duration=40)
    assert probe(data).keyframes == (0,)
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], transparency=0)
    assert probe(data).keyframes == (0,)
