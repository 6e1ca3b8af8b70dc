"""Parity: our batched Falconsai ViT equals transformers' image-classification pipeline."""

import pytest
from PIL import Image

from modgate.errors import ConfigError
from modgate.settings import load_settings
from tests.models import tiny_falconsai
from worker.detectors.falconsai_vit import FalconsaiViT
from worker.ingest.decode import Frame
from worker.tools.samples import photo, skin_scene


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_falconsai(tmp_path_factory.mktemp("falconsai"))


def test_scores_match_the_transformers_pipeline(model_dir):
    from transformers import pipeline

    detector = FalconsaiViT.load(load_settings(detectors={"paths": {"falconsai_vit": str(model_dir)}}))
    reference = pipeline("image-classification", model=str(model_dir), device="cpu")
    images = [photo(320, 240, seed=i) for i in range(4)] + [skin_scene(300, 500, seed=i) for i in range(4)]
    outputs = detector.predict([Frame(im, 1.0) for im in images])
    spread = []
    for im, out in zip(images, outputs, strict=True):
        expected = {r["label"]: r["score"] for r in reference(im, top_k=2)}
        assert set(out.scores) == {"normal", "nsfw"}
        for label, score in expected.items():
            assert abs(out.scores[label] - score) < 1e-4
        spread.append(expected["nsfw"])
    assert max(spread) - min(spread) > 1e-4  # the inputs differ enough to matter


def test_missing_local_weights_are_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="config"):
        FalconsaiViT.load(load_settings(detectors={"paths": {"falconsai_vit": str(tmp_path)}}))


def test_batch_equals_single(model_dir):
    detector = FalconsaiViT.load(load_settings(detectors={"paths": {"falconsai_vit": str(model_dir)}}))
    frames = [Frame(Image.new("RGB", (300, 200), (i * 40, 90, 30)), 1.0) for i in range(5)]
    batched = [o.scores["nsfw"] for o in detector.predict(frames)]
    single = [detector.predict([f])[0].scores["nsfw"] for f in frames]
    assert batched == pytest.approx(single, abs=1e-5)
