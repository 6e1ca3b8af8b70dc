"""The heads loaded from their original files compute what their reference code does."""

import numpy as np
import pytest
import torch

from tests.conftest import SHARED
from worker.detectors import load_multiheaded, load_q16, load_violence

MODELS = SHARED / "models"


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def test_q16_is_softmax_of_100_cosines_with_inappropriate_second():
    head = load_q16(MODELS / "q16" / "prompts_vit_l_14.p")
    import pickle

    with open(MODELS / "q16" / "prompts_vit_l_14.p", "rb") as fh:
        prompts = torch.from_numpy(pickle.load(fh).astype(np.float32))
    x = torch.randn(16, 768)
    # Q16's SimClassifier: 100 * normalised image @ normalised prompts.T, then softmax
    expected = torch.softmax(100.0 * unit(x) @ unit(prompts).T, dim=-1)
    got = head(x)
    assert torch.allclose(got, expected, atol=1e-6)
    toward_inappropriate = head(prompts[1:2] * 3.0)
    assert toward_inappropriate[0, 1] > 0.99  # the prompt itself is maximally inappropriate


def test_q16_refuses_pickles_that_are_not_arrays(tmp_path):
    import pickle

    evil = tmp_path / "evil.p"
    evil.write_bytes(pickle.dumps(print))
    with pytest.raises(pickle.UnpicklingError):
        load_q16(evil)


def test_multiheaded_equals_the_original_sequential_in_eval_mode():
    heads = load_multiheaded(MODELS / "multiheaded")
    x = torch.randn(8, 768) * 2.0  # unnormalised, like encode_image output
    got = heads(x)
    assert got.shape == (8, 5) and heads.names == ("sexual", "violent", "disturbing", "hateful", "political")
    for i, name in enumerate(heads.names):
        ref = torch.nn.Sequential(
            torch.nn.Linear(768, 384),
            torch.nn.ReLU(),
            torch.nn.Dropout(0.5),
            torch.nn.BatchNorm1d(384),
            torch.nn.Linear(384, 1),
        )
        ref.load_state_dict(
            torch.load(MODELS / "multiheaded" / f"{name}.pt", map_location="cpu", weights_only=True)
        )
        ref.eval()
        with torch.no_grad():
            assert torch.allclose(got[:, i], torch.sigmoid(ref(x)).squeeze(-1), atol=1e-6)
    assert got.std() > 0.01


def test_violence_flags_agree_with_clip_retrieval_argmax():
    head = load_violence(MODELS / "laion-clip-nsfw" / "violence_detection_vit_l_14.npy")
    prompts = torch.from_numpy(np.load(MODELS / "laion-clip-nsfw" / "violence_detection_vit_l_14.npy"))
    # embeddings spread around both directions so both outcomes occur
    x = unit(torch.randn(200, 768) * 0.02 + prompts[torch.arange(200) % 2])
    reference_violent = (unit(x) @ prompts.T).argmax(dim=1) == 1  # clip-retrieval get_violent_items
    p = head(x)
    assert torch.equal(p[:, 1] > 0.5, reference_violent)
    assert 0 < reference_violent.sum() < 200
