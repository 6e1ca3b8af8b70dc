"""Every verdict carries the image's hashes, computed where its frames are: on a decode
thread (baseline JPEG), in a decode process (PNG, animations), or on the device of the
tensor path (and sent back over the inference socket, validated), the same every way; an
EXIF-rotated file's also as ThreatExchange hashes the file (``pdq_file``), matched by banks."""

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from threatexchange.signal_type.pdq.pdq_hasher import pdq_from_file

from modgate.banks import BankSpec
from modgate.errors import ErrorCode, ModerationError
from modgate.settings import DecodeSettings, load_settings
from modgate.verdict import Source
from worker.detectors import LoadedDetectors
from worker.detectors.open_nsfw import OpenNSFW
from worker.device.decode_tensor import TensorImage, decode_batch
from worker.device.engine import InferredImage
from worker.device.pdq_tensor import device_buffer64, pdq_of_tensor
from worker.device.wire import outcome_from_json, outcome_to_json
from worker.ingest.hashing import pdq_distance, pdq_from_buffer64, pdq_hash
from worker.judge.banks import BankSet, new_bank
from worker.pipeline import Pipeline
from worker.tools.samples import photo


@pytest.fixture(scope="module")
def open_nsfw():
    return OpenNSFW.load(load_settings())


def _verdict(pipe, path):
    return pipe.submit(Source(kind="file", uri=str(path), path=str(path))).result(timeout=60)


@pytest.mark.parametrize("processes", [True, False])
def test_md5_sha256_and_pdq_of_every_shape_of_image(tmp_path, open_nsfw, processes):
    jpeg, png = tmp_path / "a.jpg", tmp_path / "b.png"
    photo(400, 300, 1).save(jpeg, "JPEG", quality=90)
    photo(400, 300, 2).save(png, "PNG")
    settings = load_settings(decode={"processes": processes}, cache={"enabled": False})
    with Pipeline(settings, LoadedDetectors([open_nsfw], {})) as pipe:
        for path in (jpeg, png):
            verdict = _verdict(pipe, path)
            data = path.read_bytes()
            assert verdict.status == "ok"
            assert verdict.hashes.md5 == hashlib.md5(data).hexdigest()
            assert verdict.source.sha256 == hashlib.sha256(data).hexdigest()
            with Image.open(path) as im:  # small images: no draft reduction, the full frame
                assert (verdict.hashes.pdq, verdict.hashes.pdq_quality) == pdq_hash(im.convert("RGB"))


@pytest.mark.parametrize("processes", [True, False])
def test_a_large_jpeg_is_hashed_at_full_size_as_threatexchange_hashes_it(tmp_path, open_nsfw, processes):
    # Open-NSFW alone would let JPEG draft decoding reduce a 1600x1200 photo to ~512 px, and
    # PDQ of that frame is bits away from ThreatExchange's: hashing.pdq=full keeps it whole.
    path = tmp_path / "big.jpg"
    photo(1600, 1200, 4).save(path, "JPEG", quality=90, progressive=processes)
    listed, quality = pdq_from_file(path)
    settings = load_settings(decode={"processes": processes}, cache={"enabled": False})
    with Pipeline(settings, LoadedDetectors([open_nsfw], {})) as pipe:
        verdict = _verdict(pipe, path)
        assert pipe._draft_side == 0
    assert (verdict.hashes.pdq, verdict.hashes.pdq_quality) == (listed, quality)
    # hashing.pdq=frame: draft decoding back on (the reduced frame's hash, within 0-12 bits).
    fast = load_settings(decode={"processes": processes}, cache={"enabled": False}, hashing={"pdq": "frame"})
    with Pipeline(fast, LoadedDetectors([open_nsfw], {})) as pipe:
        assert pipe._draft_side > 0
        assert pdq_distance(_verdict(pipe, path).hashes.pdq, listed) <= 12


def test_pdq_off_keeps_the_exact_hashes(tmp_path, open_nsfw):
    path = tmp_path / "a.png"
    photo(200, 150, 3).save(path, "PNG")
    settings = load_settings(hashing={"pdq": "off"})
    with Pipeline(settings, LoadedDetectors([open_nsfw], {})) as pipe:
        verdict = _verdict(pipe, path)
    assert verdict.hashes.pdq is None and verdict.hashes.md5 == hashlib.md5(path.read_bytes()).hexdigest()


# -- the tensor path: hashed where the frame is decoded ------------------------------------


def test_tensor_path_hashes_the_device_frame_as_threatexchange_hashes_the_file(tmp_path, open_nsfw):
    """The frame stays on the device; its PDQ (PDQ's downsample there, the 64×64 buffer to
    the host) is ThreatExchange's hash of the full decode, large or small."""
    paths = []
    for i, (w, h) in enumerate([(2400, 1800), (480, 360)]):
        path = tmp_path / f"{i}.jpg"
        photo(w, h, 60 + i).save(path, "JPEG", quality=88)
        paths.append(path)
    settings = load_settings(decode={"backend": "tensor"}, cache={"enabled": False})
    with Pipeline(settings, LoadedDetectors([open_nsfw], {})) as pipe:
        assert pipe.engine.tensor
        for path in paths:
            verdict = _verdict(pipe, path)
            assert verdict.status == "ok"
            assert (verdict.hashes.pdq, verdict.hashes.pdq_quality) == pdq_from_file(path)
    off = load_settings(decode={"backend": "tensor"}, hashing={"pdq": "off"}, cache={"enabled": False})
    with Pipeline(off, LoadedDetectors([open_nsfw], {})) as pipe:
        verdict = _verdict(pipe, paths[0])
    assert verdict.status == "ok" and verdict.hashes.pdq is None


@pytest.mark.parametrize("size", [(2400, 1800), (1800, 2400), (640, 480)])
def test_device_buffer_equals_threatexchange(tmp_path, size):
    """The device code itself (torch, here on the CPU): float64 products, the same bits."""
    path = tmp_path / "a.jpg"
    photo(*size, 70).save(path, "JPEG", quality=88)
    pixels = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    assert pdq_from_buffer64(device_buffer64(pixels)) == pdq_from_file(path)
    assert pdq_of_tensor(pixels) == pdq_from_file(path)


def _rotated(path, size, seed, orientation, **save):
    """A JPEG storing ``photo(*size, seed)``, tagged with EXIF ``orientation``."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    photo(*size, seed).save(path, "JPEG", quality=88, exif=exif.tobytes(), **save)
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("size", [(1500, 1000), (640, 480), (50, 40)])
def test_device_buffer_of_a_rotated_jpeg_is_threatexchanges_hash_of_the_file(tmp_path, size, orientation):
    """The tensor path's decode turns the frame by its EXIF orientation; the device code (on
    a CPU tensor here) with that orientation hashes the pixels as the file stores them."""
    path = _rotated(tmp_path / "a.jpg", size, 71, orientation)
    (image,) = decode_batch([path.read_bytes()], DecodeSettings(), "cpu")
    assert isinstance(image, TensorImage) and image.orientation == orientation
    expected = pdq_from_file(path)
    if min(size) >= 64:
        assert pdq_from_buffer64(device_buffer64(image.pixels, image.orientation)) == expected
    assert pdq_of_tensor(image.pixels, image.orientation) == expected
    with Image.open(path) as im:  # orientation 1: the frame as displayed, as before
        shown = pdq_hash(ImageOps.exif_transpose(im).convert("RGB"))
    assert pdq_of_tensor(image.pixels) == shown
    if min(size) >= 64:
        assert pdq_from_buffer64(device_buffer64(image.pixels)) == shown


@pytest.mark.parametrize("route", ["thread", "process", "tensor"])
def test_a_bank_of_threatexchange_hashes_matches_a_rotated_file(tmp_path, open_nsfw, route):
    """A list entry is ThreatExchange's hash of the file, computed from the file as stored;
    the upload is the same file with its EXIF orientation: it matches, whichever way it was
    decoded (a decode thread, a decode process for a progressive JPEG, the tensor path)."""
    path = _rotated(tmp_path / "a.jpg", (1200, 900), 72, 6, progressive=route == "process")
    listed, quality = pdq_from_file(path)
    bank = BankSet([new_bank(BankSpec(name="te", kind="pdq", action="unsafe"), [listed])])
    settings = load_settings(
        decode={"processes": route == "process", "backend": "tensor" if route == "tensor" else "pil"},
        cache={"enabled": False},
    )
    with Pipeline(settings, LoadedDetectors([open_nsfw], {}), banks=lambda: bank) as pipe:
        assert pipe.engine.tensor == (route == "tensor")
        verdict = _verdict(pipe, path)
    assert verdict.status == "ok" and verdict.decision == "unsafe"
    assert (verdict.hashes.pdq_file, verdict.hashes.pdq_file_quality) == (listed, quality)
    assert pdq_distance(verdict.hashes.pdq, listed) > 31  # the displayed frame's would not match
    (match,) = verdict.matches
    assert (match.bank, match.kind, match.hash, match.distance) == ("te", "pdq", listed, 0)


def test_an_upright_file_has_no_pdq_file(tmp_path, open_nsfw):
    path = _rotated(tmp_path / "a.jpg", (400, 300), 73, 1)
    with Pipeline(load_settings(cache={"enabled": False}), LoadedDetectors([open_nsfw], {})) as pipe:
        verdict = _verdict(pipe, path)
    assert verdict.hashes.pdq == pdq_from_file(path)[0]
    assert verdict.hashes.pdq_file is None and verdict.hashes.pdq_file_quality is None


def _image_reply(**extra):
    result = {"t": "frame", "outputs": {}, "errors": {}, "batch_size": 1, "queue_ms": 0.0, "infer_ms": 0.0}
    return {
        "t": "image", "format": "JPEG", "width": 8, "height": 8, "frame_count": 1,
        "decode_s": 0.0, "prepare_s": 0.0, "result": result, **extra,
    }  # fmt: skip


def test_wire_carries_the_frames_pdqs_and_refuses_malformed_ones():
    good = "0123456789abcdef" * 4
    image = outcome_from_json(_image_reply(pdqs=[[good, 87]]), frozenset())
    assert isinstance(image, InferredImage) and image.pdqs == ((good, 87),)
    assert outcome_from_json(outcome_to_json(image), frozenset()) == image
    assert outcome_from_json(_image_reply(), frozenset()).pdqs is None  # an engine with PDQ off
    for bad in (
        [[good[:-1], 87]], [[good + "0", 87]], [[good.upper(), 87]], [["z" + good[1:], 87]],
        [[good, 101]], [[good, -1]], [[good, 87.0]], [[good, "87"]], [[good]], [good, 87], [], "x", None,
    ):  # fmt: skip
        outcome = outcome_from_json(_image_reply(pdqs=bad), frozenset())
        assert isinstance(outcome, ModerationError), bad
        assert outcome.code == ErrorCode.DETECTOR_FAILED


def test_wire_carries_pdq_file_and_refuses_a_malformed_one():
    good, stored = "0123456789abcdef" * 4, "fedcba9876543210" * 4
    image = outcome_from_json(_image_reply(pdqs=[[good, 87]], pdq_file=[stored, 64]), frozenset())
    assert isinstance(image, InferredImage) and image.pdq_file == (stored, 64)
    assert outcome_from_json(outcome_to_json(image), frozenset()) == image
    assert outcome_from_json(_image_reply(pdqs=[[good, 87]]), frozenset()).pdq_file is None  # upright
    for bad in (
        [stored[:-1], 64], [stored.upper(), 64], [stored, 101], [stored, 64.0], [stored], [[stored, 64]],
        stored, None, {"hex": stored, "quality": 64},
    ):  # fmt: skip
        outcome = outcome_from_json(_image_reply(pdqs=[[good, 87]], pdq_file=bad), frozenset())
        assert isinstance(outcome, ModerationError), bad
        assert outcome.code == ErrorCode.DETECTOR_FAILED
