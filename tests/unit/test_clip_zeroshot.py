import numpy as np
import pytest
import torch

from modgate.errors import ConfigError
from modgate.settings import load_settings
from tests.conftest import SHARED
from tests.models import tiny_clip
from worker.detectors.clip_backbone import ClipBackbone, clip_preprocess
from worker.detectors.clip_zeroshot import (
    CATEGORY_IDS,
    ClipZeroShot,
    ZeroShotHead,
    category_prompts,
    encode_prompts,
)
from worker.tools.samples import photo, skin_scene

CATEGORIES_FILE = SHARED / "models" / "unsafebench" / "categories.txt"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_clip(tmp_path_factory.mktemp("clip"))


def test_one_prompt_per_class_equals_clip_logits_softmax(checkpoint):
    import open_clip
    from transformers import CLIPModel

    texts = ["a photo of a cat", "a photo of a violent fight", "a landscape"]
    class_embeds, _ = encode_prompts(checkpoint, {t: [t] for t in texts})
    backbone = ClipBackbone.load(load_settings(detectors={"paths": {"clip": str(checkpoint)}}))
    pixels = np.stack([clip_preprocess(im, 224) for im in (photo(320, 240, 1), skin_scene(300, 400, 2))])
    got = ZeroShotHead(class_embeds)(backbone.embed(pixels))
    model = CLIPModel.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        logits = model(
            input_ids=open_clip.get_tokenizer("ViT-L-14")(texts), pixel_values=torch.from_numpy(pixels)
        )
    expected = torch.softmax(logits.logits_per_image, dim=-1)
    assert torch.allclose(got, expected, atol=1e-5)


def test_prompts_come_from_every_category_definition():
    prompts = category_prompts(CATEGORIES_FILE.read_text())
    assert set(prompts) == set(CATEGORY_IDS.values())
    assert "a photo of swastika" in prompts["hate"]
    assert prompts["spam"][0].startswith("an image showing unsolicited bulk content")
    with pytest.raises(ValueError, match="lacks"):
        category_prompts("Hate: x. For example, y.")


def test_detector_scores_every_category_and_safe(checkpoint):
    settings = load_settings(
        detectors={"paths": {"clip": str(checkpoint), "clip_zeroshot": str(CATEGORIES_FILE)}}
    )
    backbone = ClipBackbone.load(settings)
    detector = ClipZeroShot.load(settings, backbone)
    pixels = np.stack([clip_preprocess(photo(300, 300, i), 224) for i in range(3)])
    for out in detector.infer(list(backbone.embed(pixels))):
        assert set(out.scores) == {*CATEGORY_IDS.values(), "safe"}
        assert sum(out.scores.values()) == pytest.approx(1.0, abs=1e-5)


def test_text_tower_must_match_the_backbone(tmp_path, checkpoint):
    other = ClipBackbone.load(
        load_settings(detectors={"paths": {"clip": str(tiny_clip(tmp_path / "o", seed=9))}})
    )
    settings = load_settings(
        detectors={"paths": {"clip": str(checkpoint), "clip_zeroshot": str(CATEGORIES_FILE)}}
    )
    with pytest.raises(ConfigError, match="projection"):
        ClipZeroShot.load(settings, other)
