"""Parity with diffusers' StableDiffusionSafetyChecker on a tiny random checkpoint built
with diffusers' class and saved with save_pretrained: identical flags, identical scores."""

import numpy as np
import pytest
import torch

from modgate.errors import ConfigError
from modgate.settings import load_settings
from tests.models import tiny_clip, tiny_safety_checker
from worker.detectors.clip_backbone import ClipBackbone, clip_preprocess
from worker.detectors.sd_safety_checker import SDSafetyChecker
from worker.tools.samples import photo, skin_scene


@pytest.fixture(scope="module")
def checker_dir(tmp_path_factory):
    return tiny_safety_checker(tmp_path_factory.mktemp("sd"), seed=3)


@pytest.fixture(scope="module")
def ours(checker_dir):
    settings = load_settings(detectors={"paths": {"sd_safety_checker": str(checker_dir)}})
    backbone = ClipBackbone.load(settings)
    return backbone, SDSafetyChecker.load(settings, backbone)


def diffusers_scores(checker_dir, pixels, monkeypatch):
    """Run diffusers' own forward and record every score it rounds, in order."""
    from diffusers.pipelines.stable_diffusion import safety_checker as module

    recorded = []

    def recording_round(value, ndigits=None):
        out = round(value, ndigits)
        recorded.append(out)
        return out

    monkeypatch.setattr(module, "round", recording_round, raising=False)
    model = module.StableDiffusionSafetyChecker.from_pretrained(checker_dir).eval()
    images = [np.zeros((8, 8, 3)) for _ in range(len(pixels))]
    _, flags = model(clip_input=torch.from_numpy(pixels), images=images)
    per_image = np.array(recorded, dtype=np.float32).reshape(len(pixels), 20)
    return per_image[:, :3], per_image[:, 3:], flags


def test_scores_and_flags_equal_diffusers(checker_dir, ours, monkeypatch):
    backbone, checker = ours
    imgs = [photo(320, 240, seed=i) for i in range(6)] + [skin_scene(300, 400, seed=i) for i in range(6)]
    pixels = np.stack([clip_preprocess(im, 224) for im in imgs])
    special_ref, concept_ref, flags_ref = diffusers_scores(checker_dir, pixels, monkeypatch)
    outputs = checker.infer(list(backbone.embed(pixels)))
    special = np.array([[o.scores[f"special_{j}"] for j in range(3)] for o in outputs], dtype=np.float32)
    concept = np.array([[o.scores[f"concept_{j:02d}"] for j in range(17)] for o in outputs], dtype=np.float32)
    flags = [o.scores["nsfw"] == 1.0 for o in outputs]
    assert np.array_equal(special, special_ref)
    assert np.array_equal(concept, concept_ref)
    assert flags == flags_ref
    assert 0 < sum(flags) < len(flags)  # the thresholds make both outcomes occur
    assert all(len(o.scores) == 22 for o in outputs)  # 20 scores + nsfw + special_care


def test_special_care_adjustment_applies_after_a_special_hit():
    from worker.detectors.sd_safety_checker import safety_scores

    image = torch.tensor([[1.0, 0.0]])
    special = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    concept = torch.tensor([[1.0, 0.0]])
    s, c = safety_scores(image, concept, torch.tensor([0.5]), special, torch.tensor([0.9, 0.9, 0.0]))
    assert s.tolist()[0] == pytest.approx([0.1, 0.11, 0.01])  # +0.01 from the second special concept on
    assert c.tolist()[0] == pytest.approx([0.51])


def test_refuses_a_backbone_with_another_projection(tmp_path, checker_dir):
    other = ClipBackbone.load(load_settings(detectors={"paths": {"clip": str(tiny_clip(tmp_path / "clip"))}}))
    settings = load_settings(detectors={"paths": {"sd_safety_checker": str(checker_dir)}})
    with pytest.raises(ConfigError, match="projection"):
        SDSafetyChecker.load(settings, other)
