"""Tensor preprocessing on CPU against each detector's PIL ``prepare``: the inputs, then
the scores of every detector (open_nsfw and nudenet on their packaged weights, the CLIP
heads and Falconsai on tiny checkpoints) through the tensor path vs the PIL path, on
photo-like JPEGs and on a mixed set whose fallbacks must get the PIL path's verdict."""

import io
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from modgate.errors import ModerationError
from modgate.settings import DecodeSettings, load_settings
from tests.conftest import SHARED
from tests.models import tiny_clip, tiny_falconsai
from worker.detectors import LoadedDetectors, load_detectors
from worker.detectors import nudenet as nudenet_module
from worker.detectors.clip_backbone import clip_preprocess
from worker.detectors.inputs import stack_inputs
from worker.detectors.nudenet import NudeNet
from worker.detectors.open_nsfw import OpenNSFW
from worker.device.decode_tensor import Fallback, TensorImage, decode_batch
from worker.device.preprocess_tensor import CLIP_KEY, TensorPreprocessor, clip_input, nudenet_input
from worker.ingest.decode import decode_image
from worker.tools.samples import photo, skin_scene

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The given buffer is not writable"),
]

TOLERANCE = 0.02
SETTINGS = DecodeSettings()


def jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=kw.pop("quality", 88), **kw)
    return buf.getvalue()


def tensor_of(data: bytes) -> TensorImage:
    [out] = decode_batch([data], SETTINGS)
    assert isinstance(out, TensorImage)
    return out


# Photo-like JPEGs: portrait, landscape, square, thumbnails (upscaled by the detectors),
# one large enough for draft decoding on the PIL path, skin scenes so nudenet fires.
SIZES = [(640, 480), (480, 720), (512, 512), (300, 200), (200, 260), (1600, 1200), (900, 600), (257, 901)]


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    return [jpeg((skin_scene if i % 2 else photo)(w, h, seed=20 + i)) for i, (w, h) in enumerate(SIZES)]


def bomb_jpeg() -> bytes:
    data = bytearray(jpeg(photo(64, 48, seed=5)))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, 60000, 60000)
    return bytes(data)


@pytest.fixture(scope="module")
def mixed() -> dict[str, bytes]:
    img = skin_scene(420, 320, seed=7)
    frames = [photo(200, 150, 60 + k) for k in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0)
    png = io.BytesIO()
    img.save(png, "PNG")
    full = jpeg(img)
    return {
        "baseline": full,
        "png": png.getvalue(),
        "gif": gif.getvalue(),
        "cmyk": jpeg(img.convert("CMYK")),
        "grayscale": jpeg(img.convert("L")),
        "progressive": jpeg(img, progressive=True),
        "truncated": full[: len(full) // 2],
        "bomb": bomb_jpeg(),
    }


# -- the two paths, as the pipeline runs them -------------------------------------------


def pil_inputs(data: bytes, loaded: LoadedDetectors, draft: bool = True) -> list[dict]:
    decoded = decode_image(data, SETTINGS, loaded.draft_side(False) if draft else 0)
    out = []
    for frame in decoded.frames:
        inputs = {}
        if loaded.backbone is not None:
            inputs[CLIP_KEY] = loaded.backbone.prepare(frame)
        for det in loaded.detectors:
            if det.input == "image":
                inputs[det.id] = det.prepare(frame)
        out.append(inputs)
    return out


def tensor_inputs(datas: list[bytes], loaded: LoadedDetectors) -> list[object]:
    """Per image: a list of frame inputs, or the ModerationError of its error verdict.
    Fallbacks go through the PIL path, as the pipeline sends them."""
    pre = TensorPreprocessor(loaded.backbone, loaded.detectors)
    outcomes = decode_batch(datas, SETTINGS)
    ready = [i for i, o in enumerate(outcomes) if isinstance(o, TensorImage)]
    prepared = dict(zip(ready, pre.prepare([outcomes[i] for i in ready]), strict=True))
    result: list[object] = []
    for i, (data, outcome) in enumerate(zip(datas, outcomes, strict=True)):
        if isinstance(outcome, TensorImage):
            result.append([prepared[i]])
        elif isinstance(outcome, ModerationError):
            result.append(outcome)
        else:
            assert isinstance(outcome, Fallback)
            try:
                result.append(pil_inputs(data, loaded))
            except ModerationError as exc:
                result.append(exc)
    return result


def infer(loaded: LoadedDetectors, frames: list[dict]) -> list[dict]:
    """One batch through every detector, as Pipeline._infer does (max over nothing: per frame)."""
    embeddings = None
    if loaded.backbone is not None:
        embeddings = list(loaded.backbone.embed(stack_inputs([f[CLIP_KEY] for f in frames])))
    outputs: list[dict] = [{} for _ in frames]
    for det in loaded.detectors:
        inputs = embeddings if det.input == "clip_embedding" else [f[det.id] for f in frames]
        for row, out in zip(outputs, det.infer(inputs), strict=True):
            row[det.id] = out
    return outputs


def verdicts(per_image: list[object], loaded: LoadedDetectors) -> list[object]:
    """Per image: ("error", code) or a list of per-frame {detector: DetectorOutput}."""
    frames = [f for item in per_image if isinstance(item, list) for f in item]
    outputs = iter(infer(loaded, frames)) if frames else iter(())
    result: list[object] = []
    for item in per_image:
        if isinstance(item, ModerationError):
            result.append(("error", item.code))
        else:
            result.append([next(outputs) for _ in item])
    return result


def pil_verdicts(datas: list[bytes], loaded: LoadedDetectors, draft: bool = True) -> list[object]:
    per_image: list[object] = []
    for data in datas:
        try:
            per_image.append(pil_inputs(data, loaded, draft))
        except ModerationError as exc:
            per_image.append(exc)
    return verdicts(per_image, loaded)


def assert_close(tensor: list[object], pil: list[object], names: list[str]) -> float:
    worst = 0.0
    for name, t, p in zip(names, tensor, pil, strict=True):
        if isinstance(p, tuple):
            assert t == p, name
            continue
        assert isinstance(t, list) and len(t) == len(p), name
        for tf, pf in zip(t, p, strict=True):
            assert tf.keys() == pf.keys()
            for det, out in pf.items():
                for key, value in out.scores.items():
                    diff = abs(tf[det].scores[key] - value)
                    worst = max(worst, diff)
                    assert diff <= TOLERANCE, (name, det, key, tf[det].scores[key], value)
    return worst


# -- fixtures: detectors ----------------------------------------------------------------


@pytest.fixture(scope="module")
def open_nsfw():
    return OpenNSFW.load(load_settings())


@pytest.fixture(scope="module")
def nudenet():
    return NudeNet.load(load_settings())


@pytest.fixture(scope="module")
def clip_family(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tensor-clip")
    models = SHARED / "models"
    settings = load_settings(
        detectors={
            "enabled": ["q16", "multiheaded", "laion_violence", "clip_zeroshot", "falconsai_vit"],
            "paths": {
                "clip": str(tiny_clip(tmp / "clip")),
                "q16": str(models / "q16" / "prompts_vit_l_14.p"),
                "multiheaded": str(models / "multiheaded"),
                "laion_violence": str(models / "laion-clip-nsfw" / "violence_detection_vit_l_14.npy"),
                "clip_zeroshot": str(models / "unsafebench" / "categories.txt"),
                "falconsai_vit": str(tiny_falconsai(tmp / "falconsai")),
            },
            "backbone_space": "openai/ViT-L-14",
        }
    )
    return load_detectors(settings)


# -- inputs -------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (320, 320), (641, 640), (200, 120), (1999, 1500)])
def test_nudenet_input_is_cv2s_bit_for_bit(size):
    """Pad bottom/right + cv2 INTER_LINEAR (fixed point, no antialias) + BGR /255: the same
    floats as nudenet.preprocess, including 2× (cv2's INTER_AREA shortcut) and upscales."""
    data = jpeg(skin_scene(*size, seed=size[0]))
    image = tensor_of(data)
    blob, width, height, scale = nudenet_input(image.pixels)
    reference = nudenet_module.preprocess([np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))])
    assert (width, height, scale) == (size[0], size[1], 1.0)
    assert blob.shape == reference.shape
    np.testing.assert_array_equal(blob.numpy(), reference)


@pytest.mark.parametrize("size", [(640, 480), (300, 500), (224, 224), (1200, 300)])
def test_clip_input_is_within_one_grey_level_of_pils(size):
    data = jpeg(photo(*size, seed=size[1]))
    image = tensor_of(data)
    ours = clip_input(image.pixels, 224).numpy()
    reference = clip_preprocess(Image.open(io.BytesIO(data)).convert("RGB"), 224)
    assert ours.shape == reference.shape == (3, 224, 224)
    # one uint8 step of the resize, through CLIP's std (~0.26)
    assert np.abs(ours - reference).max() <= 1.0 / 255.0 / 0.26 + 1e-5


def test_tensor_inputs_stack_with_pil_inputs():
    a = torch.ones(3, 2, 2)
    b = np.zeros((3, 2, 2), dtype=np.float32)
    stacked = stack_inputs([a, b])
    assert isinstance(stacked, torch.Tensor) and stacked.shape == (2, 3, 2, 2)
    assert isinstance(stack_inputs([b, b]), np.ndarray)


# -- scores ---------------------------------------------------------------------------------


def test_open_nsfw_scores_match_the_pil_path(open_nsfw, photos):
    loaded = LoadedDetectors([open_nsfw], {})
    assert loaded.draft_side(False) > 0  # the PIL reference decodes in draft mode here
    tensor = verdicts(tensor_inputs(photos, loaded), loaded)
    pil = pil_verdicts(photos, loaded)
    assert_close(tensor, pil, [str(s) for s in SIZES])
    spread = [p[0]["open_nsfw"].scores["nsfw"] for p in pil]
    assert max(spread) - min(spread) > 0.01  # not a comparison of constants
    # Against full-size PIL decodes (the tensor path has no draft mode) it is closer still:
    # the same pixels, and resizes within one grey level before the JPEG round trip.
    full = pil_verdicts(photos, loaded, draft=False)
    assert assert_close(tensor, full, [str(s) for s in SIZES]) <= 0.005


def test_nudenet_detections_are_the_pil_paths(nudenet, photos):
    loaded = LoadedDetectors([nudenet], {})
    tensor = verdicts(tensor_inputs(photos, loaded), loaded)
    pil = pil_verdicts(photos, loaded)
    assert_close(tensor, pil, [str(s) for s in SIZES])
    found = 0
    for t, p in zip(tensor, pil, strict=True):
        assert t[0]["nudenet"].details == p[0]["nudenet"].details
        found += len(p[0]["nudenet"].details["detections"])
    assert found > 0  # the skin scenes make it fire


def test_clip_heads_and_falconsai_scores_match_the_pil_path(clip_family, photos):
    assert clip_family.backbone is not None
    assert {d.id for d in clip_family.detectors} == {
        "q16",
        "multiheaded",
        "laion_violence",
        "clip_zeroshot",
        "falconsai_vit",
    }
    tensor = verdicts(tensor_inputs(photos, clip_family), clip_family)
    pil = pil_verdicts(photos, clip_family)
    assert_close(tensor, pil, [str(s) for s in SIZES])


def test_the_mixed_set_gets_the_pil_paths_verdicts(open_nsfw, nudenet, mixed):
    loaded = LoadedDetectors([open_nsfw, nudenet], {})
    names = list(mixed)
    datas = list(mixed.values())
    outcomes = dict(zip(names, decode_batch(datas, SETTINGS), strict=True))
    # progressive JPEGs decode in the killable decode processes (their cost grows with scans)
    for name in ("png", "gif", "cmyk", "truncated", "progressive"):
        assert isinstance(outcomes[name], Fallback), name
    for name in ("baseline", "grayscale"):
        assert isinstance(outcomes[name], TensorImage), name
    assert isinstance(outcomes["bomb"], ModerationError)

    tensor = dict(zip(names, verdicts(tensor_inputs(datas, loaded), loaded), strict=True))
    pil = dict(zip(names, pil_verdicts(datas, loaded), strict=True))
    assert_close(list(tensor.values()), list(pil.values()), names)
    assert tensor["truncated"] == pil["truncated"] == ("error", "corrupt_image")
    assert tensor["bomb"] == pil["bomb"] == ("error", "image_too_large")
    assert len(tensor["gif"]) == 3  # the animation's frames, from the PIL path


def test_the_decode_batch_forms_across_submitters_and_isolates_failures(open_nsfw):
    """TensorStage: images submitted from many threads decode in batches; a batch function
    that raises for one image fails that image only."""
    from concurrent.futures import ThreadPoolExecutor

    from worker.device.preprocess_tensor import TensorPath, TensorResult, TensorStage

    path = TensorPath(SETTINGS, "cpu", None, [open_nsfw])
    sizes: list[int] = []
    real_run = path.run

    def run(datas, cancels=None):
        sizes.append(len(datas))
        if any(d == b"\xff\xd8\xffboom" for d in datas):
            raise RuntimeError("boom")
        return real_run(datas, cancels)

    path.run = run
    stage = TensorStage(path, max_batch=8, max_wait_s=0.5)
    datas = [jpeg(photo(160 + i, 120, seed=i)) for i in range(6)] + [b"\xff\xd8\xffboom"]
    try:
        with ThreadPoolExecutor(7) as pool:
            futures = list(pool.map(stage.submit, datas))
        for f in futures[:6]:
            assert isinstance(f.result(timeout=60), TensorResult)
        with pytest.raises(RuntimeError, match="boom"):
            futures[6].result(timeout=60)
    finally:
        stage.close()
    assert max(sizes) > 1  # batched, not one by one


# -- end to end ------------------------------------------------------------------------------


def test_modgate_scan_with_the_tensor_backend_gives_the_pil_verdicts(tmp_path, mixed):
    """``modgate scan`` in a subprocess, MODGATE_DECODE__BACKEND=tensor vs pil, over the
    mixed set (fallbacks and errors included) plus a large photo: the same statuses and
    error codes, scores within 0.02, and the large JPEG's open_nsfw score moved (the PIL
    path drafts it, the tensor path decodes it whole: the tensor path really ran)."""
    import json
    import os
    import subprocess
    import sys

    images = tmp_path / "images"
    images.mkdir()
    suffix = {"png": ".png", "gif": ".gif"}
    for name, data in mixed.items():
        (images / f"{name}{suffix.get(name, '.jpg')}").write_bytes(data)
    (images / "large.jpg").write_bytes(jpeg(photo(2400, 1800, seed=11)))
    (images / "empty.jpg").write_bytes(b"")
    runs = {}
    scan = [sys.executable, "-m", "worker.cli", "scan"]
    for backend in ("pil", "tensor"):
        out = tmp_path / f"{backend}.jsonl"
        proc = subprocess.run(
            [*scan, str(images), "-o", str(out), "--detectors", "open_nsfw", "--no-progress"],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "MODGATE_DECODE__BACKEND": backend},
        )
        assert proc.returncode == 0, proc.stderr
        runs[backend] = {
            os.path.basename(v["source"]["path"]): v for v in map(json.loads, out.read_text().splitlines())
        }
    pil, tensor = runs["pil"], runs["tensor"]

    def code(verdict: dict) -> str | None:
        return (verdict["error"] or {}).get("code")

    assert set(pil) == set(tensor) and len(pil) == len(mixed) + 2
    for name, p in pil.items():
        t = tensor[name]
        assert (t["status"], code(t)) == (p["status"], code(p)), name
        if p["status"] == "ok":
            assert t["image"] == p["image"] and t["frames"] == p["frames"], name
            for key, value in p["detectors"]["open_nsfw"]["scores"].items():
                assert abs(t["detectors"]["open_nsfw"]["scores"][key] - value) <= TOLERANCE, (name, key)
    assert code(tensor["truncated.jpg"]) == "corrupt_image"
    assert code(tensor["bomb.jpg"]) == "image_too_large"
    assert code(tensor["empty.jpg"]) == "empty_object"
    large = [r["large.jpg"]["detectors"]["open_nsfw"]["scores"]["nsfw"] for r in (pil, tensor)]
    assert large[0] != large[1]


def test_jobs_cancelled_during_preprocessing_stop_there():
    """A detector without a tensor preprocessing gets its PIL prepare per image on a host
    copy; a job cancelled meanwhile is skipped and comes back Cancelled, not prepared."""
    from worker.device.decode_tensor import Cancelled
    from worker.device.preprocess_tensor import TensorPath, TensorResult

    class Flag:
        cancelled = False

    flags = [Flag(), Flag(), Flag()]
    seen = []

    class Cancelling:
        id = "cancelling"
        input = "image"

        def prepare(self, frame):
            seen.append(frame.image.size)
            flags[1].cancelled = flags[2].cancelled = True  # the others' messages time out
            return np.asarray(frame.image)

    path = TensorPath(SETTINGS, "cpu", None, [Cancelling()])
    datas = [jpeg(photo(100 + i, 80, seed=i)) for i in range(3)]
    results = path.run(datas, flags)
    assert isinstance(results[0], TensorResult) and results[0].inputs["cancelling"].shape == (80, 100, 3)
    assert all(isinstance(r, Cancelled) for r in results[1:])
    assert seen == [(100, 80)]
