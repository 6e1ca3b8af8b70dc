"""Parity: our batched NudeNet equals nudenet.NudeDetector (pre-processing blob exactly,
post-processing exactly, end to end: class, score within 1e-3, box within 1 px)."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modgate.settings import load_settings
from worker.ingest.decode import Frame
from worker.tools.samples import photo, skin_scene

nudenet_ref = pytest.importorskip("nudenet.nudenet")
from worker.detectors import nudenet as ours  # noqa: E402


@pytest.fixture(scope="module")
def detector():
    return ours.NudeNet.load(load_settings())


@pytest.mark.parametrize(("h", "w"), [(480, 640), (640, 480), (333, 517), (320, 320), (1001, 97)])
def test_input_blob_is_identical(h, w):
    rgb = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    # cv2.imread would hand the reference BGR pixels
    reference = nudenet_ref._read_image(np.ascontiguousarray(rgb[:, :, ::-1]), 320)[0]
    assert np.array_equal(ours.preprocess([rgb]), reference)


@pytest.mark.parametrize("seed", range(4))
def test_postprocessing_is_identical_on_crowded_outputs(seed):
    rng = np.random.default_rng(seed)
    out = np.zeros((1, 22, 2100), np.float32)
    out[0, 0:2] = rng.uniform(0, 320, (2, 2100))
    out[0, 2:4] = rng.uniform(5, 120, (2, 2100))
    out[0, 4:] = rng.uniform(0, 0.35, (18, 2100))  # hundreds above threshold, overlapping: NMS matters
    width, height = 517, 333
    side = max(width, height)
    expected = nudenet_ref._postprocess([out], side - width, side - height, 0, 0, width, height, 320, 320)
    got = ours.postprocess(out[0], width, height)
    assert len(expected) > 50
    assert got == expected


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    d = tmp_path_factory.mktemp("nudenet")
    paths = []
    for seed in (3, 5, 15, 16, 29, 0, 1):
        path = d / f"{seed}.png"
        skin_scene(480, 640, seed).save(path)
        paths.append(path)
    photo(800, 600, 7).save(d / "plain.png")
    return [*paths, d / "plain.png"]


def test_detections_match_the_reference_end_to_end(detector, scenes):
    reference = nudenet_ref.NudeDetector()
    frames = [Frame(Image.open(p).convert("RGB"), 1.0) for p in scenes]
    outputs = detector.predict(frames)
    total = 0
    for path, out in zip(scenes, outputs, strict=True):
        expected = reference.detect(str(path))
        got = out.details["detections"]
        assert [d["class"] for d in got] == [d["class"] for d in expected], path
        for g, e in zip(got, expected, strict=True):
            assert abs(g["score"] - e["score"]) < 1e-3
            assert max(abs(a - b) for a, b in zip(g["box"], e["box"], strict=True)) <= 1
        total += len(expected)
    assert total >= 4  # the scenes do make the model fire


def test_scores_summarise_detections(detector, scenes):
    out = detector.predict([Frame(Image.open(scenes[0]).convert("RGB"), 1.0)])[0]
    dets = out.details["detections"]
    assert set(out.scores) == {*ours.LABELS, "sexual"}
    sexual = [d["score"] for d in dets if d["class"] in ours.SEXUAL_LABELS]
    assert out.scores["sexual"] == (max(sexual) if sexual else 0.0)


def test_reduced_frames_report_boxes_in_original_coordinates():
    out = np.zeros((22, 2100), np.float32)
    out[:4, 0] = [160, 160, 64, 32]  # a box in the middle of a square frame
    out[4 + 1, 0] = 0.9
    full = ours.postprocess(out, 320, 320, scale=1.0)
    half = ours.postprocess(out, 320, 320, scale=0.5)
    assert full[0]["box"] == [128, 144, 64, 32]
    assert half[0]["box"] == [256, 288, 128, 64]


# -- the torch route (runtime.onnx): the same ONNX file converted to a torch module --------


@pytest.fixture(scope="module")
def torch_detector():
    return ours.NudeNet.load(load_settings(runtime={"device": "cpu", "onnx": "torch"}))


@pytest.fixture(scope="module")
def parity_frames():
    """Generated scenes (some make the model fire), a plain photo, and a real portrait
    (matplotlib's sample photo: NudeNet finds a face) in several framings."""
    import matplotlib

    hopper = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")
    images = [skin_scene(480, 640, seed) for seed in range(20)] + [photo(800, 600, 7)]
    images += [
        hopper,
        hopper.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        hopper.resize((300, 400)),
        hopper.crop((0, 0, 512, 300)),
        hopper.rotate(10),
    ]
    return [Frame(img, 1.0) for img in images]


def test_cpu_runs_onnxruntime_unless_told_otherwise(torch_detector):
    default = ours.NudeNet.load(load_settings(runtime={"device": "cpu"}))
    assert (default.graph.runtime, default.device) == ("onnxruntime", "cpu")
    assert (torch_detector.graph.runtime, torch_detector.device) == ("torch", "cpu")


def test_torch_module_gives_identical_detections(detector, torch_detector, parity_frames):
    expected = detector.predict(parity_frames)
    got = torch_detector.predict(parity_frames)
    total = 0
    for i, (e, g) in enumerate(zip(expected, got, strict=True)):
        e_dets, g_dets = e.details["detections"], g.details["detections"]
        # same boxes after threshold and NMS, same labels, in the same order
        assert [(d["class"], d["box"]) for d in g_dets] == [(d["class"], d["box"]) for d in e_dets], i
        for a, b in zip(g_dets, e_dets, strict=True):
            assert abs(a["score"] - b["score"]) < 1e-4
        total += len(e_dets)
    assert total >= 8  # enough boxes that this compares detections, not empty lists
    classes = {d["class"] for out in expected for d in out.details["detections"]}
    assert "FACE_FEMALE" in classes and len(classes) >= 2


def test_torch_module_raw_outputs_match(detector, torch_detector, parity_frames):
    blob = np.concatenate([detector.prepare(f)[0] for f in parity_frames[-6:]])
    expected = detector.run(blob)
    got = torch_detector.run(blob)
    assert got.shape == expected.shape == (6, 22, 2100)
    assert np.abs(got[:, :4] - expected[:, :4]).max() < 5e-3  # box coordinates, px at 320
    assert np.abs(got[:, 4:] - expected[:, 4:]).max() < 1e-4  # class scores


def test_reduced_precision_leaves_nudenet_in_fp32(detector, parity_frames):
    settings = load_settings(runtime={"device": "cpu", "onnx": "torch", "precision": "bf16"})
    bf16 = ours.NudeNet.load(settings)
    assert bf16.graph.autocast is None
    frames = parity_frames[:8] + parity_frames[-5:]
    expected = [[(d["class"], d["box"]) for d in o.details["detections"]] for o in detector.predict(frames)]
    got = [[(d["class"], d["box"]) for d in o.details["detections"]] for o in bf16.predict(frames)]
    assert got == expected and any(expected)


# -- onnxruntime on CPU: batch lanes (default) vs one intra-op pool ------------------------


def test_batch_lanes_match_the_intra_op_pool(parity_frames):
    cpu = {"device": "cpu", "threads": 3}
    lanes = ours.NudeNet.load(load_settings(runtime=cpu))
    pool = ours.NudeNet.load(load_settings(runtime={**cpu, "onnx_cpu_parallel": "op"}))
    assert (lanes.graph.lanes, pool.graph.lanes) == (3, 1)
    blob = np.concatenate([lanes.prepare(f)[0] for f in parity_frames])
    expected = pool.run(blob)
    got = lanes.run(blob)  # 26 images: chunks of 9, 9 and 8, in order
    assert got.shape == expected.shape == (len(parity_frames), 22, 2100)
    assert np.abs(got[:, :4] - expected[:, :4]).max() < 1e-3  # box coordinates, px at 320
    assert np.abs(got[:, 4:] - expected[:, 4:]).max() < 1e-5  # class scores

    def boxes(detector):
        outputs = detector.predict(parity_frames)
        return [[(d["class"], d["box"]) for d in o.details["detections"]] for o in outputs]

    assert boxes(lanes) == boxes(pool)
    assert sum(map(len, boxes(lanes))) >= 8
