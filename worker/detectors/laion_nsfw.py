"""``laion_nsfw``: LAION's CLIP-based NSFW detector, rebuilt in torch from the original
AutoKeras SavedModel zips without TensorFlow.

The network is MultiCategoryEncoding → Normalization → Dense → ReLU → … → Dense(1) →
sigmoid. AutoKeras took a few embedding columns for categorical ones: it formats those
values as strings (``%f``, six decimals) and looks them up in a vocabulary learned from
the training set (index = rank + 1, unknown = 0) before normalising. That lookup is part
of the model; without it scores drift by up to 0.014 (measured on the reference set).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from worker.detectors.keras_savedmodel import multi_category_encoding, read_lookup_tables, read_variables


def _read_savedmodel(path: Path) -> dict[str, bytes]:
    wanted = {
        "index": "variables/variables.index",
        "data": "variables/variables.data-00000-of-00001",
        "graph": "saved_model.pb",
        "metadata": "keras_metadata.pb",
    }
    if path.is_dir():
        return {k: (path / rel).read_bytes() for k, rel in wanted.items()}
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        out = {}
        for key, rel in wanted.items():
            member = next((n for n in names if n.endswith(rel)), None)
            if member is None:
                raise ValueError(f"{path}: no {rel} inside the zip")
            out[key] = zf.read(member)
        return out


class LaionNSFWHead(nn.Module):
    """Embeddings (N, D) → NSFW probability (N,), exactly as LAION's Keras model computes it."""

    def __init__(
        self,
        mean: np.ndarray,
        variance: np.ndarray,
        dense: list[tuple[np.ndarray, np.ndarray]],
        lookups: dict[int, dict[str, int]],
    ) -> None:
        super().__init__()
        self.register_buffer("mean", torch.from_numpy(mean.astype(np.float32)))
        # Keras Normalization divides by max(sqrt(variance), epsilon).
        self.register_buffer("std", torch.from_numpy(np.maximum(np.sqrt(variance), 1e-7).astype(np.float32)))
        layers: list[nn.Module] = []
        for i, (kernel, bias) in enumerate(dense):
            linear = nn.Linear(kernel.shape[0], kernel.shape[1])
            with torch.no_grad():
                linear.weight.copy_(torch.from_numpy(kernel.T.copy()))
                linear.bias.copy_(torch.from_numpy(bias))
            layers.append(linear)
            if i < len(dense) - 1:
                layers.append(nn.ReLU())
        self.mlp = nn.Sequential(*layers)
        self.lookups = lookups
        self.dim = int(mean.shape[0])

    def encode(self, embeddings: torch.Tensor) -> torch.Tensor:
        x = embeddings.detach().to(torch.float64).cpu()
        x = torch.nan_to_num(x, nan=0.0)
        if self.lookups:
            x = x.clone()
            for column, vocab in self.lookups.items():
                x[:, column] = torch.tensor([float(vocab.get(f"{v:f}", 0)) for v in x[:, column].tolist()])
        return x.to(torch.float32).to(self.mean.device)

    def network(self, encoded: torch.Tensor) -> torch.Tensor:
        """The continuous part: normalisation and the dense layers on ``encode``'s output."""
        x = (encoded - self.mean) / self.std
        return torch.sigmoid(self.mlp(x)).squeeze(-1)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.network(self.encode(embeddings))


def load_laion_nsfw(path: str | Path) -> LaionNSFWHead:
    """Load LAION's ``clip_autokeras_binary_nsfw.zip`` / ``clip_autokeras_nsfw_b32.zip``
    (or the folder it extracts to) into a torch module."""
    parts = _read_savedmodel(Path(path))
    variables = read_variables(parts["index"], parts["data"])
    norm = {k.split("/")[1]: v for k, v in variables.items() if k.startswith("layer_with_weights-1/")}
    dense = []
    i = 2
    while f"layer_with_weights-{i}/kernel/.ATTRIBUTES/VARIABLE_VALUE" in variables:
        prefix = f"layer_with_weights-{i}/"
        dense.append(
            (
                variables[prefix + "kernel/.ATTRIBUTES/VARIABLE_VALUE"],
                variables[prefix + "bias/.ATTRIBUTES/VARIABLE_VALUE"],
            )
        )
        i += 1
    encodings = multi_category_encoding(parts["metadata"])
    columns = [c for c, enc in enumerate(encodings) if enc != "none"]
    tables = read_lookup_tables(parts["graph"], "serving_default_input_1")
    if len(tables) != len(columns):
        raise ValueError(f"{path}: {len(columns)} categorical columns but {len(tables)} lookup tables")
    return LaionNSFWHead(norm["mean"], norm["variance"], dense, dict(zip(columns, tables, strict=True)))
