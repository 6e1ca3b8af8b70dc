"""The score cache on a stream where half the uploads repeat earlier bytes (re-shares, the
same file under another key): end-to-end images/s of the same pipeline with the cache on
and off, side by side in one run, and how many images the models scored.

The stream: ``--count`` distinct images (worker.tools.samples' bench set, 0.3–12 MP JPEGs,
PNG, WebP), then a copy of each under another name: the repeats reach the pipeline after
their originals finished, as a re-upload comes later.
Detectors: the offline-capable ensemble of this machine (Open-NSFW; NudeNet when its
extra is installed). Wall time, best of ``--rounds``.

    python bench/bench_repeats.py [--count 48] [--rounds 2] [--out bench/results/repeats.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modgate.settings import load_settings
from modgate.verdict import Source
from worker.detectors import load_detectors
from worker.judge.score_cache import MemoryScoreCache
from worker.pipeline import Pipeline
from worker.tools.samples import bench_set

OUT = Path(__file__).resolve().parent / "results" / "repeats.json"


def _sources(paths: list[Path]) -> list[Source]:
    return [Source(kind="file", uri=str(p), path=str(p)) for p in paths]


def run(settings, loaded, originals: list[Path], copies: list[Path], cache: bool) -> dict[str, float]:
    scored = {"verdicts": 0, "cached": 0}
    with Pipeline(settings, loaded, cache=MemoryScoreCache(settings.cache) if cache else None) as pipe:
        start = time.perf_counter()
        for batch in (originals, copies):  # repeats come after their originals
            for verdict in pipe.moderate(_sources(batch)):
                scored["verdicts"] += 1
                scored["cached"] += verdict.cached_from is not None
        wall = time.perf_counter() - start
    return {"wall_s": round(wall, 3), "images_per_s": round(scored["verdicts"] / wall, 2), **scored}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    settings = load_settings()
    loaded = load_detectors(settings)
    with tempfile.TemporaryDirectory() as tmp:
        originals = bench_set(Path(tmp) / "a", args.count)
        copies = []
        for p in originals:  # the same bytes under another name
            copies.append(Path(shutil.copy(p, Path(tmp) / f"copy-{p.name}")))
        results = {}
        for cache in (False, True):
            runs = [run(settings, loaded, originals, copies, cache) for _ in range(args.rounds)]
            results["cache_on" if cache else "cache_off"] = min(runs, key=lambda r: r["wall_s"])
    report = {
        "count": 2 * args.count,
        "repeats": args.count,
        "detectors": sorted(d.id for d in loaded.detectors),
        **results,
        "speedup": round(results["cache_off"]["wall_s"] / results["cache_on"]["wall_s"], 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
