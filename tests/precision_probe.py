"""Measure reduced precision against fp32 on the kernel path this process runs on.

``python -m tests.precision_probe`` prints one JSON object: torch's CPU capability, the
oneDNN ISA cap and thread count it ran under, and per precision (bf16, fp16) the
backbone's embedding deviation and the LAION head's deviation on those embeddings, split
into what the network moves (categorical lookups held at the fp32 values) and what the
lookups do. The precision tests run it once per kernel path in a subprocess, since
``ATEN_CPU_CAPABILITY`` and ``ONEDNN_MAX_CPU_ISA`` are read once, when torch starts.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

N_IMAGES = 8


def measure(workdir: Path) -> dict[str, Any]:
    import torch

    from modgate.settings import load_settings
    from tests.conftest import SHARED
    from tests.models import tiny_clip
    from worker.detectors import load_laion_nsfw
    from worker.detectors.clip_backbone import ClipBackbone, clip_preprocess
    from worker.tools.samples import photo

    clip = tiny_clip(workdir / "clip")
    detectors = {"paths": {"clip": str(clip)}, "backbone_space": "openai/ViT-L-14"}
    pixels = np.stack([clip_preprocess(photo(320, 240, seed=i), 224) for i in range(N_IMAGES)])
    head = load_laion_nsfw(SHARED / "models" / "laion-clip-nsfw" / "clip_autokeras_binary_nsfw.zip")
    columns = sorted(head.lookups)

    def embed(precision: str) -> tuple[np.ndarray, str]:
        backbone = ClipBackbone.load(
            load_settings(detectors=detectors, runtime={"device": "cpu", "precision": precision})
        )
        out = backbone.embed(pixels)
        return np.asarray(out, dtype=np.float64), str(out.dtype)

    full, _ = embed("fp32")
    with torch.no_grad():
        encoded_full = head.encode(torch.tensor(full))
        score_full = head.network(encoded_full)
    report: dict[str, Any] = {
        "capability": torch.backends.cpu.get_cpu_capability(),
        "aten_cpu_capability": os.environ.get("ATEN_CPU_CAPABILITY"),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
        "threads": torch.get_num_threads(),
    }
    for precision in ("bf16", "fp16"):
        low, dtype = embed(precision)
        cosine = (full * low).sum(1) / np.linalg.norm(full, axis=1) / np.linalg.norm(low, axis=1)
        relative = np.abs(full - low).max(1) / np.abs(full).max(1)
        with torch.no_grad():
            encoded_low = head.encode(torch.tensor(low))
            held = encoded_low.clone()
            held[:, columns] = encoded_full[:, columns]
            network_delta = (head.network(held) - score_full).abs().max()
            total_delta = (head.network(encoded_low) - score_full).abs().max()
        report[precision] = {
            "embedding_dtype": dtype,
            "min_cosine": float(cosine.min()),
            "max_relative": float(relative.max()),
            "head_network_delta": float(network_delta),
            "head_total_delta": float(total_delta),
            "lookup_flips": int((encoded_low[:, columns] != encoded_full[:, columns]).sum()),
        }
    return report


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(measure(Path(tmp))))


if __name__ == "__main__":
    main()
