"""Every verdict carries the image's hashes, computed where its frames are: on a decode
thread (baseline JPEG), in a decode process (PNG, animations), or on the device of the
tensor path (and sent back over the inference socket, validated), the same every way."""

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image
from threatexchange.signal_type.pdq.pdq_hasher import pdq_from_file

from modgate.errors import ErrorCode, ModerationError
from modgate.settings import load_settings
from modgate.verdict import Source
from worker.detectors import LoadedDetectors
from worker.detectors.open_nsfw import OpenNSFW
from worker.device.engine import InferredImage
from worker.device.pdq_tensor import device_buffer64, pdq_of_tensor
from worker.device.wire import outcome_from_json, outcome_to_json
from worker.ingest.hashing import pdq_from_buffer64, pdq_hash
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
