"""CLIP family benchmark: ratios measured side by side, in one run.

(a) all CLIP heads together ÷ the backbone forward alone (goal ≤ 1.05): the heads
    (sd_safety_checker, laion_nsfw, q16, multiheaded, laion_violence) must cost next to
    nothing once the shared embedding exists.
(b) the ensemble ÷ the naive way the seeds show (every detector preprocesses and runs
    its own CLIP, one image at a time): goal ≥ 4× on CPU with the CLIP heads.

The backbone is a randomly initialised ViT-B/32-sized CLIP tower (12 layers, width 768,
patch 32) with a 768-d projection, so the compute is real and the original L/14 heads fit.

    python bench/bench_clip.py [--images 64] [--batch 16] [--out bench/results/clip.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modgate.settings import load_settings
from worker.detectors import load_detectors
from worker.detectors.clip_backbone import clip_preprocess
from worker.tools import bench
from worker.tools.samples import photo

HEADS = ["sd_safety_checker", "laion_nsfw", "q16", "multiheaded", "laion_violence"]


def shared_models() -> Path:
    for candidate in (os.environ.get("MODGATE_SHARED_DIR"), Path(__file__).resolve().parents[2] / "shared"):
        if candidate and (Path(candidate) / "models").is_dir():
            return Path(candidate) / "models"
    raise SystemExit("set MODGATE_SHARED_DIR to the folder holding models/ (original head weights)")


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--naive-images", type=int, default=16, help="the naive way is slow: time it on fewer"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/clip.json"))
    args = parser.parse_args()

    shared = shared_models()
    tmp = Path(tempfile.mkdtemp(prefix="modgate-bench-clip-"))
    settings = load_settings(
        detectors={
            "enabled": HEADS,
            "backbone_space": "openai/ViT-L-14",
            "paths": {
                "sd_safety_checker": str(
                    bench.random_checkpoints(tmp, "b32", ["sd_safety_checker"])["sd_safety_checker"]
                ),
                "laion_nsfw": str(shared / "laion-clip-nsfw" / "clip_autokeras_binary_nsfw.zip"),
                "q16": str(shared / "q16" / "prompts_vit_l_14.p"),
                "multiheaded": str(shared / "multiheaded"),
                "laion_violence": str(shared / "laion-clip-nsfw" / "violence_detection_vit_l_14.npy"),
            },
        }
    )
    loaded = load_detectors(settings)
    backbone, heads = loaded.backbone, loaded.detectors
    assert backbone is not None
    images = [photo(640, 480, seed=i) for i in range(args.images)]
    n_naive = args.naive_images
    pixels = np.stack([clip_preprocess(im, 224) for im in images])
    batches = [pixels[i : i + args.batch] for i in range(0, len(pixels), args.batch)]

    def backbone_only() -> None:
        for b in batches:
            backbone.embed(b)

    def backbone_and_heads() -> None:
        for b in batches:
            rows = list(backbone.embed(b))
            for head in heads:
                head.infer(rows)

    def ours_from_images() -> None:
        prepared = np.stack([clip_preprocess(im, 224) for im in images])
        for i in range(0, len(prepared), args.batch):
            rows = list(backbone.embed(prepared[i : i + args.batch]))
            for head in heads:
                head.infer(rows)

    embeddings = [list(backbone.embed(b)) for b in batches]

    def heads_alone() -> None:
        for rows in embeddings:
            for head in heads:
                head.infer(rows)

    naive_images = images[: max(8, n_naive)]

    def naive_from_images() -> None:
        # What the seeds do: every detector preprocesses the image and runs its own CLIP.
        for im in naive_images:
            for head in heads:
                x = clip_preprocess(im, 224)[None]
                head.infer(list(backbone.embed(x)))

    backbone_only()  # warm-up
    t_backbone = t_heads = float("inf")
    for _ in range(args.repeats):  # interleaved: machine drift hits both alike
        t_backbone = min(t_backbone, timed(backbone_only, 1))
        t_heads = min(t_heads, timed(backbone_and_heads, 1))
    t_heads_alone = timed(heads_alone, args.repeats)
    t_ours = timed(ours_from_images, args.repeats)
    t_naive = timed(naive_from_images, 1) * len(images) / len(naive_images)
    n = len(images)
    result = {
        "benchmark": "clip",
        "heads": [h.id for h in heads],
        "backbone": "random CLIP ViT-B/32-sized tower, 768-d projection",
        "images": n,
        "batch": args.batch,
        "images_per_s": {
            "backbone_only": round(n / t_backbone, 2),
            "backbone_and_heads": round(n / t_heads, 2),
            "ensemble_from_images": round(n / t_ours, 2),
            "naive_from_images": round(n / t_naive, 2),
        },
        "seconds": {"backbone_only": t_backbone, "backbone_and_heads": t_heads, "heads_alone": t_heads_alone},
        "ratios": {
            # Heads timed on the run's own embeddings: two large, noisy totals would hide
            # a cost this small, so the direct quotient is reported beside it.
            "heads_over_backbone_time": round((t_backbone + t_heads_alone) / t_backbone, 4),
            "heads_over_backbone_time_direct": round(t_heads / t_backbone, 3),
            "ensemble_over_naive": round(t_naive / t_ours, 2),
        },
        "goals": {
            "heads_over_backbone_time": "<= 1.05",
            "heads_over_backbone_time_direct": "<= 1.05",
            "ensemble_over_naive": ">= 4",
        },
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "cuda": torch.cuda.is_available(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for k, v in result["images_per_s"].items():
        print(f"{k:<24}{v:>10.2f} images/s")
    for k, v in result["ratios"].items():
        print(f"{k:<32}{v:>8}   (goal {result['goals'][k]})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
