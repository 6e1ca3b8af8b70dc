"""Small heads that score CLIP image embeddings, loaded from their original files:
Q16's prompt embeddings, the five MultiHeaded classifiers, LAION's violence direction.
Each loader returns a torch module mapping a batch of backbone embeddings (N, D) to that
detector's scores (N, K); ``SCORE_NAMES`` names the K columns.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch import nn

MULTIHEADED_HEADS = ("sexual", "violent", "disturbing", "hateful", "political")
SCORE_NAMES = {
    "q16": ("non_inappropriate", "inappropriate"),
    "laion_violence": ("non_violent", "violent"),
    "multiheaded": MULTIHEADED_HEADS,
}
# CLIP's own logit scale: Q16 multiplies cosines by 100 before its softmax.
LOGIT_SCALE = 100.0


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Q16 ships a pickled numpy array; unpickle nothing but numpy arrays."""

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
        }
    )

    def find_class(self, module: str, name: str):  # type: ignore[no-untyped-def]
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        if module.startswith("numpy.core"):
            module = module.replace("numpy.core", "numpy._core", 1) if hasattr(np, "_core") else module
        return super().find_class(module, name)


class PromptSoftmax(nn.Module):
    """softmax(100 · cos(image, prompts)): Q16, and LAION's violence direction."""

    def __init__(self, prompts: np.ndarray) -> None:
        super().__init__()
        prompts = torch.from_numpy(np.asarray(prompts, dtype=np.float32))
        self.register_buffer("prompts", prompts / prompts.norm(dim=-1, keepdim=True))
        self.dim = int(prompts.shape[1])

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        image = embeddings.float()
        image = image / image.norm(dim=-1, keepdim=True)
        return torch.softmax(LOGIT_SCALE * image @ self.prompts.T, dim=-1)


def load_q16(path: str | Path) -> PromptSoftmax:
    """Q16's ``prompts.p`` (2 × D float16: non-inappropriate, inappropriate)."""
    with open(path, "rb") as fh:
        prompts = _NumpyOnlyUnpickler(fh).load()
    if not isinstance(prompts, np.ndarray) or prompts.ndim != 2 or prompts.shape[0] != 2:
        raise ValueError(f"{path}: expected a (2, D) array of prompt embeddings")
    return PromptSoftmax(prompts)


def load_violence(path: str | Path) -> PromptSoftmax:
    """LAION's ``violence_detection_vit_*.npy`` (2 × D; index 1 is violent, as clip-retrieval reads it)."""
    prompts = np.load(path, allow_pickle=False)
    if prompts.ndim != 2 or prompts.shape[0] != 2:
        raise ValueError(f"{path}: expected a (2, D) array")
    return PromptSoftmax(prompts)


def _multiheaded_mlp(state: dict[str, torch.Tensor]) -> nn.Sequential:
    dim, hidden = state["0.weight"].shape[1], state["0.weight"].shape[0]
    mlp = nn.Sequential(
        nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(0.5), nn.BatchNorm1d(hidden), nn.Linear(hidden, 1)
    )
    mlp.load_state_dict(state)
    return mlp.eval()


class MultiHeaded(nn.Module):
    """The five MultiHeaded classifiers: sigmoid(MLP(embedding)) on the unnormalised
    ``encode_image`` output, as the unsafe-diffusion code feeds them."""

    def __init__(self, heads: dict[str, nn.Sequential]) -> None:
        super().__init__()
        self.names = tuple(heads)
        self.heads = nn.ModuleDict(heads)
        self.dim = int(next(iter(heads.values()))[0].in_features)
        self.eval()

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        x = embeddings.float()
        return torch.cat([torch.sigmoid(self.heads[n](x)) for n in self.names], dim=-1)


def load_multiheaded(directory: str | Path) -> MultiHeaded:
    """The ``{sexual,violent,disturbing,hateful,political}.pt`` state dicts in ``directory``."""
    directory = Path(directory)
    heads = {}
    for name in MULTIHEADED_HEADS:
        path = directory / f"{name}.pt"
        if not path.is_file():
            raise FileNotFoundError(f"multiheaded: {path} not found")
        heads[name] = _multiheaded_mlp(torch.load(path, map_location="cpu", weights_only=True))
    return MultiHeaded(heads)
