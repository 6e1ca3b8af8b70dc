"""Parity: the TensorFlow-free loader reproduces LAION's own TensorFlow scores."""

import numpy as np
import pytest
import torch

from tests.conftest import SHARED
from worker.detectors.laion_nsfw import load_laion_nsfw

MODELS = SHARED / "models" / "laion-clip-nsfw"

CASES = [
    ("clip_autokeras_binary_nsfw.zip", "laion_l14_dev.npz", 768),
    ("clip_autokeras_nsfw_b32.zip", "laion_b32_dev.npz", 512),
]


@pytest.mark.parametrize(("zip_name", "reference", "dim"), CASES)
def test_scores_match_laion_tensorflow_within_1e5(zip_name, reference, dim):
    head = load_laion_nsfw(MODELS / zip_name)
    ref = np.load(SHARED / "reference" / reference)
    assert ref["embeddings"].shape[1] == dim == head.dim
    scores = head(torch.from_numpy(ref["embeddings"])).detach().numpy()
    assert np.abs(scores - ref["nsfw_score"].ravel()).max() < 1e-5
    assert np.ptp(ref["nsfw_score"]) > 0.1  # a real spread of scores, not a constant


def test_categorical_columns_are_looked_up_not_passed_through():
    head = load_laion_nsfw(MODELS / "clip_autokeras_binary_nsfw.zip")
    assert sorted(head.lookups) == [180, 316, 413, 440, 644]
    vocab = head.lookups[180]
    known = next(iter(vocab))
    x = torch.zeros(2, 768, dtype=torch.float64)
    x[0, 180] = float(known)
    x[1, 180] = 12.345678  # not in the vocabulary: the out-of-vocabulary index 0
    encoded = head.encode(x)
    assert encoded[0, 180].item() == vocab[known] and encoded[1, 180].item() == 0.0


def test_extracted_folder_loads_like_the_zip(tmp_path):
    import zipfile

    with zipfile.ZipFile(MODELS / "clip_autokeras_nsfw_b32.zip") as zf:
        zf.extractall(tmp_path)
    folder = load_laion_nsfw(tmp_path / "clip_autokeras_nsfw_b32")
    zipped = load_laion_nsfw(MODELS / "clip_autokeras_nsfw_b32.zip")
    x = torch.randn(4, 512)
    x = x / x.norm(dim=-1, keepdim=True)
    assert torch.equal(folder(x), zipped(x))
