"""JPEG draft decoding changes pixels; the scores it yields must stay within 0.02 of a
full-resolution decode (the detectors' reference path) on photo-sized JPEGs."""

import io

import pytest

from modgate.settings import DecodeSettings, load_settings
from worker.detectors.open_nsfw import OpenNSFW
from worker.ingest.decode import decode_image
from worker.tools.samples import photo, skin_scene

SIZES = [(1600, 1200), (2000, 1500), (3000, 2000), (4000, 3000), (1200, 1600), (4032, 3024)]


def jpegs():
    for i, (w, h) in enumerate(SIZES * 2):
        buf = io.BytesIO()
        photo(w, h, seed=300 + i).save(buf, "JPEG", quality=90)
        yield buf.getvalue()


def test_open_nsfw_draft_deviation_below_002():
    detector = OpenNSFW.load(load_settings())
    worst = 0.0
    reduced = 0
    for data in jpegs():
        draft = decode_image(data, DecodeSettings(), detector.min_side).frames
        full = decode_image(data, DecodeSettings(draft=False), detector.min_side).frames
        reduced += draft[0].scale < 1.0
        a, b = (o.scores["nsfw"] for o in detector.predict(draft + full))
        worst = max(worst, abs(a - b))
    assert reduced >= len(SIZES)  # most of them were really draft-decoded
    assert worst < 0.02


def test_nudenet_opts_out_and_stays_exact_on_large_jpegs(tmp_path):
    """NudeNet point-samples the full-size image and cuts boxes at fixed confidences, so
    a draft decode makes boxes appear or vanish. With NudeNet enabled the pipeline decodes
    at full size, and its detections on large JPEGs equal the reference's."""
    nudenet_ref = pytest.importorskip("nudenet")
    from modgate.verdict import Source
    from worker.detectors import LoadedDetectors
    from worker.detectors.nudenet import NudeNet
    from worker.pipeline import Pipeline

    settings = load_settings()
    detector = NudeNet.load(settings)
    loaded = LoadedDetectors([OpenNSFW.load(settings), detector], {})
    assert loaded.draft_side() == 0
    assert loaded.draft_side(always=True) == detector.min_side
    assert LoadedDetectors([OpenNSFW.load(settings)], {}).draft_side() == OpenNSFW.min_side

    paths = []
    for i, (w, h) in enumerate(SIZES):
        paths.append(tmp_path / f"{i}.jpg")
        skin_scene(w, h, seed=i).save(paths[-1], quality=90)
    with Pipeline(settings, loaded) as pipe:
        verdicts = {
            v.source.path: v
            for v in pipe.moderate(Source(kind="file", uri=str(p), path=str(p)) for p in paths)
        }
    reference = nudenet_ref.NudeDetector()
    total = 0
    for path in paths:
        expected = reference.detect(str(path))
        got = verdicts[str(path)].detectors["nudenet"].details["detections"]
        assert [d["class"] for d in got] == [d["class"] for d in expected]
        for g, e in zip(got, expected, strict=True):
            assert abs(g["score"] - e["score"]) < 1e-3
            assert max(abs(a - b) for a, b in zip(g["box"], e["box"], strict=True)) <= 1
        total += len(expected)
    assert total >= 2
