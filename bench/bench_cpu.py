"""CPU node benchmark: how close the CPU pipeline gets to what the machine can do.

Runs ``modgate bench`` (worker/tools/bench.py) in one process over the same generated
large-photo JPEG mix (0.3–12 MP) with ``open_nsfw`` + ``nudenet``, for each variant in
turn: full-size and draft decoding, each with onnxruntime's CPU parallelism as before
(``runtime.onnx_cpu_parallel=op``: one intra-op pool, whose caller spins at every
operator's end) and as now (``batch``: the batch split over single-threaded lanes). Per
variant: end to end and pure images/s, the limit set by unavoidable work and the
fraction reached, and the CPU end to end spends per image over that work. The earlier
OpenCV comparison (one thread per core per call vs ``runtime.preprocess_threads=1``)
stays available: ``--variants full_decode_cv2_threads_per_core,...``.

    python bench/bench_cpu.py [--seconds 30] [--count 24] [--out bench/results/cpu.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from modgate.settings import load_settings
from worker.detectors import load_detectors
from worker.tools import bench

DETECTORS = ["open_nsfw", "nudenet"]
DRAFT = {"draft_always": True}
OP = {"onnx_cpu_parallel": "op"}
CV2_PER_CORE = {"preprocess_threads": bench.cpu_count()}
VARIANTS = {
    "full_decode_onnx_op": {"decode": {}, "runtime": OP},
    "full_decode": {"decode": {}, "runtime": {}},
    "draft_decode_onnx_op": {"decode": DRAFT, "runtime": OP},
    "draft_decode": {"decode": DRAFT, "runtime": {}},
    "full_decode_cv2_threads_per_core": {"decode": {}, "runtime": {**OP, **CV2_PER_CORE}},
    "draft_decode_cv2_threads_per_core": {"decode": DRAFT, "runtime": {**OP, **CV2_PER_CORE}},
}
DEFAULT_VARIANTS = ("full_decode_onnx_op", "full_decode", "draft_decode_onnx_op", "draft_decode")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--images", type=Path, default=Path(".cache/bench-images-jpeg"))
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=", ".join(VARIANTS))
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds over the variants (interleaved); with more than one, each variant also "
        "gets the median of its fractions: one round moves by ±10 points on a busy 2-core VM",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/cpu.json"))
    args = parser.parse_args()

    paths = bench.jpeg_mix(args.images, args.count)
    results: dict = {}
    rounds: dict[str, list[dict]] = {}
    for round_ in range(args.repeat):
        for name in args.variants.split(","):
            r = run_variant(name, paths, args)
            rounds.setdefault(name, []).append(r)
            results[name] = r
            if args.repeat > 1:
                print(f"  (round {round_ + 1} of {args.repeat})", flush=True)
    if args.repeat > 1:
        results["medians"] = {
            name: {
                "achieved_fraction": statistics.median(r["limit"]["achieved_fraction"] for r in runs),
                "fractions": [round(r["limit"]["achieved_fraction"], 4) for r in runs],
                "cpu_overhead": statistics.median(r["limit"]["cpu_overhead"] for r in runs),
                "images_per_s": statistics.median(r["end_to_end"]["images_per_s"] for r in runs),
            }
            for name, runs in rounds.items()
        }
        for name, m in results["medians"].items():
            print(
                f"{name:<36} median of {args.repeat}: fraction {100 * m['achieved_fraction']:5.1f}% "
                f"(each: {', '.join(f'{100 * f:.1f}' for f in m['fractions'])}), "
                f"{m['images_per_s']:.2f}/s, {m['cpu_overhead']:.2f}x the work"
            )
    out = {"benchmark": "cpu", "command": "python bench/bench_cpu.py " + " ".join(sys.argv[1:]), **results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


def run_variant(name: str, paths: list[Path], args: argparse.Namespace) -> dict:
    """One ``modgate bench`` run of a variant (the last round's run is what --out keeps)."""
    v = VARIANTS[name]
    # Draft decoding hashes the reduced frame (hashing.pdq=frame): full-size hashing turns it off.
    hashing = {"pdq": "frame"} if v["decode"] is DRAFT else {}
    settings = load_settings(
        detectors={"enabled": DETECTORS}, decode=v["decode"], runtime=v["runtime"], hashing=hashing
    )
    r = bench.run_bench(settings, paths, args.seconds, str(args.images), load_detectors(settings))
    lim, e2e = r["limit"], r["end_to_end"]
    print(
        f"{name:<36} end to end {e2e['images_per_s']:6.2f}/s, limit {lim['images_per_s']:6.2f}/s, "
        f"fraction {100 * lim['achieved_fraction']:5.1f}% "
        f"(alone: {100 * lim['fraction_if_unshared']:5.1f}%), CPU {e2e['core_ms_per_image']:6.1f} "
        f"core-ms/img = {lim['cpu_overhead']:.2f}x the work",
        flush=True,
    )
    return r


if __name__ == "__main__":
    main()
