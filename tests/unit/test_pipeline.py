"""The pipeline wires real stages; the detectors here are the real Open-NSFW model plus,
where a test needs a detector to fail, a small double defined in this file."""

import io
from collections.abc import Sequence

import pytest
from PIL import Image

from worker.detectors import LoadedDetectors
from worker.detectors.base import Detector, DetectorOutput
from worker.detectors.open_nsfw import OpenNSFW
from worker.errors import ErrorCode
from worker.pipeline import Pipeline
from worker.settings import load_settings
from worker.verdict import Source


class ExplodesOnRed(Detector):
    """Fails on frames whose top-left pixel is pure red, to prove isolation."""

    id = "explodes_on_red"
    min_side = 0
    model = "test/explodes"
    revision = "1"

    @classmethod
    def load(cls, settings):
        return cls()

    def infer(self, frames: Sequence) -> list[DetectorOutput]:
        if any(f.image.getpixel((0, 0)) == (255, 0, 0) for f in frames):
            raise RuntimeError("red frame")
        return [DetectorOutput({"score": 0.0}) for _ in frames]


def write(path, color, size=(320, 240), fmt="PNG"):
    Image.new("RGB", size, color).save(path, fmt)
    return path


def file_source(path) -> Source:
    return Source(kind="file", uri=str(path), path=str(path))


@pytest.fixture(scope="module")
def settings():
    return load_settings(batch={"max_batch": 8, "max_wait_ms": 20})


@pytest.fixture(scope="module")
def open_nsfw(settings):
    return OpenNSFW.load(settings)


def test_one_verdict_per_image_with_scores_and_timings(tmp_path, settings, open_nsfw):
    paths = [write(tmp_path / f"{i}.png", (i * 20, 100, 50)) for i in range(10)]
    with Pipeline(settings, LoadedDetectors([open_nsfw], {})) as pipe:
        verdicts = list(pipe.moderate(file_source(p) for p in paths))
    assert sorted(v.source.path for v in verdicts) == sorted(map(str, paths))
    for v in verdicts:
        assert v.status == "ok" and v.decision in ("safe", "review", "unsafe")
        assert 0.0 <= v.detectors["open_nsfw"].scores["nsfw"] <= 1.0
        assert set(v.timings_ms) >= {"fetch_ms", "decode_ms", "queue_ms", "infer_ms", "total_ms"}
        assert v.image.width == 320 and v.frames == 1
        assert v.categories["sexual"].covered and not v.categories["violence"].covered
    assert pipe._batcher.batches_run < 10  # they were batched, not run one by one


def test_a_detector_failure_costs_only_its_image(tmp_path, settings, open_nsfw):
    good = [write(tmp_path / f"g{i}.png", (0, 0, 255)) for i in range(5)]
    bad = write(tmp_path / "red.png", (255, 0, 0))
    detectors = LoadedDetectors([open_nsfw, ExplodesOnRed()], {})
    with Pipeline(settings, detectors) as pipe:
        verdicts = {v.source.path: v for v in pipe.moderate(file_source(p) for p in [*good, bad])}
    assert verdicts[str(bad)].status == "error"
    assert verdicts[str(bad)].error.code == ErrorCode.DETECTOR_FAILED
    assert "explodes_on_red" in verdicts[str(bad)].error.message
    assert all(verdicts[str(p)].status == "ok" for p in good)


def test_bad_inputs_become_error_verdicts(tmp_path, settings, open_nsfw):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_bytes(b"hello")
    buf = io.BytesIO()
    Image.new("RGB", (400, 300), (9, 9, 9)).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[:200])
    sources = [file_source(tmp_path / n) for n in ("empty.jpg", "text.jpg", "cut.jpg", "missing.jpg")]
    with Pipeline(settings, LoadedDetectors([open_nsfw], {})) as pipe:
        codes = {v.source.uri.rsplit("/", 1)[1]: v.error.code for v in pipe.moderate(sources)}
    assert codes == {
        "empty.jpg": ErrorCode.EMPTY_OBJECT,
        "text.jpg": ErrorCode.UNSUPPORTED_FORMAT,
        "cut.jpg": ErrorCode.CORRUPT_IMAGE,
        "missing.jpg": ErrorCode.NOT_FOUND,
    }


def test_animation_is_as_unsafe_as_its_worst_frame(tmp_path, settings, open_nsfw):
    frames = [Image.new("RGB", (256, 256), (i * 30, 80, 200 - i * 20)) for i in range(6)]
    anim = tmp_path / "anim.gif"
    frames[0].save(anim, save_all=True, append_images=frames[1:], duration=50)
    stills = []
    for i, frame in enumerate(frames):
        stills.append(tmp_path / f"f{i}.gif")
        frame.save(stills[-1])
    with Pipeline(settings, LoadedDetectors([open_nsfw], {})) as pipe:
        by_path = {v.source.path: v for v in pipe.moderate(file_source(p) for p in [anim, *stills])}
    animated = by_path[str(anim)]
    assert animated.frames == 6 and animated.image.frame_count == 6
    worst = max(by_path[str(p)].detectors["open_nsfw"].scores["nsfw"] for p in stills)
    assert animated.detectors["open_nsfw"].scores["nsfw"] == pytest.approx(worst, abs=1e-6)
