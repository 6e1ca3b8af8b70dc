"""The tensor decode path on CPU: Pillow's pixels, Pillow's EXIF orientation, the shared
decode budget before any decode, and per-image fallbacks that never fail the batch."""

import io
import struct

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from modgate.errors import ErrorCode, ModerationError
from modgate.settings import DecodeSettings
from tests.faults.hostile import scan_bomb_jpeg
from worker.detectors.inputs import to_device
from worker.device.decode_tensor import (
    Accepted,
    Cancelled,
    Fallback,
    TensorImage,
    backend_for,
    classify,
    decode_batch,
)
from worker.ingest.decode import decode_image
from worker.tools.samples import photo, skin_scene


def jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def with_orientation(img: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg(img, exif=exif.tobytes(), quality=92)


def bomb_jpeg(width: int = 60000, height: int = 60000) -> bytes:
    """A JPEG whose SOF0 declares a huge canvas: the header of a decompression bomb."""
    data = bytearray(jpeg(photo(64, 48, seed=5)))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def pixels_hwc(image: TensorImage) -> np.ndarray:
    return image.pixels.permute(1, 2, 0).numpy()


SETTINGS = DecodeSettings()
# torchvision 0.29 deprecates its codecs (pytest re-enables the warning the module filters).
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The given buffer is not writable"),
]


@pytest.mark.parametrize(
    "kind",
    ["baseline", "q95_444", "grayscale", "odd_size"],
)
def test_baseline_jpegs_decode_to_pillows_pixels(kind):
    img = skin_scene(641, 479, seed=3)
    data = {
        "baseline": lambda: jpeg(img),
        "q95_444": lambda: jpeg(img, quality=95, subsampling=0),
        "grayscale": lambda: jpeg(img.convert("L")),
        "odd_size": lambda: jpeg(photo(333, 1001, seed=4)),
    }[kind]()
    [out] = decode_batch([data], SETTINGS)
    assert isinstance(out, TensorImage), out
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert out.pixels.dtype == torch.uint8 and out.pixels.shape[0] == 3
    np.testing.assert_array_equal(pixels_hwc(out), reference)
    assert (out.width, out.height) == (reference.shape[1], reference.shape[0])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_pillows(orientation):
    data = with_orientation(photo(120, 80, seed=orientation), orientation)
    [out] = decode_batch([data], SETTINGS)
    assert isinstance(out, TensorImage)
    reference = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    np.testing.assert_array_equal(pixels_hwc(out), np.asarray(reference))
    decoded = decode_image(data, SETTINGS, min_side=0)
    assert (out.width, out.height) == (decoded.width, decoded.height)


def test_what_the_tensor_path_leaves_to_pillow():
    img = photo(200, 150, seed=1)
    base = jpeg(img)
    cases = {
        "png": encoded(img, "PNG"),
        "gif": encoded(img.convert("P"), "GIF"),
        "webp": encoded(img, "WEBP"),
        "cmyk": jpeg(img.convert("CMYK")),
        "truncated": base[: len(base) // 2],
        "empty": b"",
        "not an image": b"hello world",
    }
    for name, data in cases.items():
        assert isinstance(classify(data, SETTINGS), Fallback), name
    assert isinstance(classify(base, SETTINGS), Accepted)
    # Progressive: each scan is a pass over the image; it goes where a time limit holds.
    assert isinstance(classify(jpeg(img, progressive=True), SETTINGS), Fallback)


def test_scan_bomb_is_refused_by_the_shared_budget_before_any_decode(monkeypatch):
    def no_decode(*_a, **_k):
        raise AssertionError("decoded a scan bomb")

    monkeypatch.setattr("torchvision.io.decode_jpeg", no_decode)
    bomb = scan_bomb_jpeg(64, 200)
    [out] = decode_batch([bomb], SETTINGS)
    assert isinstance(out, ModerationError) and out.code == ErrorCode.IMAGE_TOO_COMPLEX
    assert "scans" in out.message
    # under the budget it still is not decoded here: the PIL path (a decode process) takes it
    [out] = decode_batch([bomb], DecodeSettings(max_jpeg_scans=1000))
    assert isinstance(out, Fallback)


def test_bomb_header_is_refused_by_the_shared_budget_before_any_decode(monkeypatch):
    def no_decode(*_a, **_k):
        raise AssertionError("decoded a bomb")

    monkeypatch.setattr("torchvision.io.decode_jpeg", no_decode)
    [out] = decode_batch([bomb_jpeg()], SETTINGS)
    assert isinstance(out, ModerationError) and out.code == ErrorCode.IMAGE_TOO_LARGE
    with pytest.raises(ModerationError) as pil:
        decode_image(bomb_jpeg(), SETTINGS, min_side=0)
    assert pil.value.code == out.code and pil.value.message == out.message
    # the limit is the setting's, whichever path reads it
    small = DecodeSettings(max_pixels=100 * 100)
    [out] = decode_batch([jpeg(photo(200, 150, seed=1))], small)
    assert isinstance(out, ModerationError) and out.code == ErrorCode.IMAGE_TOO_LARGE


def test_a_mixed_batch_never_fails_and_keeps_its_order():
    good = [jpeg(photo(300 + 10 * i, 200, seed=i)) for i in range(3)]
    bad = jpeg(photo(100, 100, seed=9))
    batch = [good[0], encoded(photo(50, 50, seed=2), "PNG"), bomb_jpeg(), good[1], bad[:300], good[2], b""]
    outcomes = decode_batch(batch, SETTINGS)
    kinds = [type(o).__name__ for o in outcomes]
    assert kinds == [
        "TensorImage",
        "Fallback",
        "ModerationError",
        "TensorImage",
        "Fallback",
        "TensorImage",
        "Fallback",
    ]
    for data, out in zip(good, [outcomes[0], outcomes[3], outcomes[5]], strict=True):
        assert out.width == Image.open(io.BytesIO(data)).width


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_decoder_failure_falls_back_for_that_image_only(monkeypatch, device):
    """A decoder error costs its image only. On "cuda" decode_jpeg is replaced by a stand-in
    with nvJPEG's batch semantics (a list with one bad image raises, returns nothing), which
    the tensor path answers by decoding one by one; the stand-in decodes on the CPU."""
    real = __import__("torchvision.io", fromlist=["decode_jpeg"]).decode_jpeg
    datas = [jpeg(photo(120, 90, seed=i)) for i in range(3)]
    poisoned = len(datas[1])
    calls = []

    def flaky(inp, **kw):
        items = inp if isinstance(inp, list) else [inp]
        calls.append(len(items) if isinstance(inp, list) else 0)
        if any(t.numel() == poisoned for t in items):
            raise RuntimeError("nvjpeg: bad image")
        return real(inp, **{**kw, "device": "cpu"})

    monkeypatch.setattr("torchvision.io.decode_jpeg", flaky)
    outcomes = decode_batch(datas, SETTINGS, device=device)
    assert isinstance(outcomes[0], TensorImage) and isinstance(outcomes[2], TensorImage)
    assert isinstance(outcomes[1], Fallback) and "bad image" in outcomes[1].reason
    if device == "cuda":
        assert calls == [3, 0, 0, 0]  # the batch, then one by one
    else:
        assert sorted(calls) == [0, 0, 0]  # one image per call, on the decode threads


def test_a_damaged_scan_that_still_ends_in_eoi_decodes_as_pillow_decodes_it():
    """libjpeg fills the missing scan with grey and only warns, in Pillow and torchvision
    alike: both paths score the same pixels (a cut without EOI goes to Pillow instead)."""
    data = jpeg(photo(400, 300, seed=3))
    damaged = data[: len(data) // 2] + b"\xff\xd9"
    [out] = decode_batch([damaged], SETTINGS)
    assert isinstance(out, TensorImage)
    reference = np.asarray(Image.open(io.BytesIO(damaged)).convert("RGB"))
    np.testing.assert_array_equal(pixels_hwc(out), reference)
    [cut] = decode_batch([data[: len(data) // 2]], SETTINGS)
    assert isinstance(cut, Fallback)


def test_cancelled_jobs_are_not_decoded(monkeypatch):
    class Flag:
        def __init__(self, value):
            self.cancelled = value

    seen = []
    real = __import__("torchvision.io", fromlist=["decode_jpeg"]).decode_jpeg

    def counting(inp, **kw):
        seen.extend(inp if isinstance(inp, list) else [inp])
        return real(inp, **kw)

    monkeypatch.setattr("torchvision.io.decode_jpeg", counting)
    datas = [jpeg(photo(100, 80, seed=i)) for i in range(3)]
    outcomes = decode_batch(datas, SETTINGS, cancels=[None, Flag(True), Flag(False)])
    assert isinstance(outcomes[1], Cancelled)
    assert isinstance(outcomes[0], TensorImage) and isinstance(outcomes[2], TensorImage)
    assert len(seen) == 2


def test_backend_choice():
    assert backend_for("auto", "cuda") == "tensor"
    assert backend_for("auto", "cpu") == "pil"
    assert backend_for("tensor", "cpu") == "tensor"
    assert backend_for("pil", "cuda") == "pil"
    assert DecodeSettings().backend == "auto"


def test_to_device_is_a_no_op_on_cpu():
    t = torch.arange(4, dtype=torch.uint8)
    assert to_device(t, "cpu") is t
