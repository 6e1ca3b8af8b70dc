"""PDQ bank index (worker/judge/bank_index.py): lookups per second on one core, index
memory, and add/remove rates at 10⁴, 10⁵ and 10⁶ random hashes (10⁷ with ``--full``:
~1.1 GB of index, ~2 min to build; not run in CI).

Per size, one process state, in this order:

- ``build``: all hashes added in one call (a worker's start-up load); ``memory``: bytes the
  index's arrays hold (``memory_bytes``), and what ``tracemalloc`` sees allocated (current
  after the build, peak during it) and the RSS growth;
- ``lookup``: single-hash searches at radius 31 on one thread, half of them near-duplicates
  of stored hashes at distance 0..31 (each must be found: checked), half random (no match);
- ``add_single`` / ``remove_single``: one hash per call (``modgate banks add``, take-down
  feedback); ``add_batch``: 1,000 per call (a chunk of the changes stream or of an import);
  merges of the delta into the tables happen inside these calls and are part of the rate;
- ``merge``: one merge of the delta into the tables on its own: how long the sync thread
  spends in it (lookups go on meanwhile), and the memory it adds while it runs;
- ``exact``: a sample of searches compared with a brute-force popcount scan.

    python bench/bench_banks.py [--full] [--lookups 5000] [--out bench/results/banks.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from worker.judge.bank_index import PdqIndex, codes_to_hex, hex_to_codes  # noqa: E402

RADIUS = 31


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def random_codes(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 2**64, (n, 4), dtype=np.uint64)


def flip(code: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    out = code.copy()
    for bit in rng.choice(256, k, replace=False):
        out[bit // 64] ^= np.uint64(1) << np.uint64(63 - bit % 64)
    return out


def brute(codes: np.ndarray, query: np.ndarray, radius: int) -> set[str]:
    dist = np.bitwise_count(codes ^ query).sum(axis=1)
    return set(codes_to_hex(codes[dist <= radius]))


def rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else float("inf")


def bench_size(n: int, lookups: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    codes = random_codes(rng, n)
    gc.collect()
    index = PdqIndex()
    rss0 = rss_bytes()
    tracemalloc.start()
    t = time.perf_counter()
    index.add_codes(codes)
    build_s = time.perf_counter() - t
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss1 = rss_bytes()
    built_bytes = index.memory_bytes()

    # Lookups: near-duplicates of stored hashes at distance 0..31, and random hashes.
    picks = rng.integers(0, n, lookups // 2)
    near = [codes_to_hex(flip(codes[i], k % (RADIUS + 1), rng)[None])[0] for k, i in enumerate(picks)]
    far = codes_to_hex(random_codes(rng, lookups - len(near)))
    stored = codes_to_hex(codes[picks])
    t = time.perf_counter()
    near_hits = [index.search(q, RADIUS) for q in near]
    near_s = time.perf_counter() - t
    t = time.perf_counter()
    far_hits = [index.search(q, RADIUS) for q in far]
    far_s = time.perf_counter() - t
    missed = sum(1 for want, got in zip(stored, near_hits, strict=True) if want not in {h for h, _ in got})
    far_found = sum(len(h) for h in far_hits)

    # Exactness against a brute-force scan (a sample: each scan is O(n)).
    sample = min(100 if n <= 10**6 else 20, len(near))
    mismatches = 0
    for q in near[:sample] + far[:sample]:
        query = hex_to_codes([q])[0]
        if {h for h, _ in index.search(q, RADIUS)} != brute(codes, query, RADIUS):
            mismatches += 1

    # Updates.
    singles = codes_to_hex(random_codes(rng, 2000))
    t = time.perf_counter()
    for h in singles:
        index.add([h])
    add_single_s = time.perf_counter() - t
    batch = random_codes(rng, 20 * 1000)
    t = time.perf_counter()
    for i in range(0, len(batch), 1000):
        index.add_codes(batch[i : i + 1000])
    add_batch_s = time.perf_counter() - t
    victims = singles[:500] + codes_to_hex(codes[rng.choice(n, 500, replace=False)])
    t = time.perf_counter()
    for h in victims:
        index.remove([h])
    remove_s = time.perf_counter() - t
    still = sum(1 for h in victims if h in index)
    t = time.perf_counter()
    after = [index.search(q, RADIUS) for q in near[:1000]]
    after_s = time.perf_counter() - t
    del after
    # One merge of the delta into the tables, timed, with the memory it adds while running.
    index.add_codes(random_codes(rng, 1000))
    gc.collect()
    tracemalloc.start()
    t = time.perf_counter()
    with index._lock:
        index._merge(index._snap.delta_end)
    merge_s = time.perf_counter() - t
    _, merge_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    result = {
        "hashes": n,
        "p_bits": index._snap.p,
        "build_s": round(build_s, 2),
        "build_hashes_per_s": rate(n, build_s),
        "memory": {
            "index_arrays_mib": round(built_bytes / 2**20, 1),
            "index_arrays_after_updates_mib": round(index.memory_bytes() / 2**20, 1),
            "tracemalloc_after_build_mib": round(current / 2**20, 1),
            "tracemalloc_peak_during_build_mib": round(peak / 2**20, 1),
            "rss_growth_mib": round((rss1 - rss0) / 2**20, 1),
            "bytes_per_hash": round(built_bytes / n, 1),
        },
        "lookup": {
            "radius": RADIUS,
            "near_per_s": rate(len(near), near_s),
            "random_per_s": rate(len(far), far_s),
            "all_per_s": rate(lookups, near_s + far_s),
            "us_per_lookup": round((near_s + far_s) / lookups * 1e6, 1),
            "near_duplicates_missed": missed,
            "random_queries_matched": far_found,
            "after_updates_per_s": rate(1000, after_s),
        },
        "merge": {"seconds": round(merge_s, 3), "extra_peak_mib": round(merge_peak / 2**20, 1)},
        "add_single_per_s": rate(len(singles), add_single_s),
        "add_batch_1000_hashes_per_s": rate(len(batch), add_batch_s),
        "remove_single_per_s": rate(len(victims), remove_s),
        "removed_still_found": still,
        "exact": {"queries": 2 * sample, "mismatches_vs_brute_force": mismatches},
    }
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="also 10⁷ hashes (~2 min, ~3 GB peak)")
    ap.add_argument("--sizes", type=int, nargs="*", help="override the sizes")
    ap.add_argument("--lookups", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "banks.json")
    args = ap.parse_args()
    sizes = args.sizes or ([10**4, 10**5, 10**6] + ([10**7] if args.full else []))
    runs = [bench_size(n, args.lookups, args.seed) for n in sizes]
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    document = {
        "what": "PDQ bank index: exact radius-31 search over random 256-bit hashes, one thread",
        "command": "python bench/bench_banks.py" + (" --full" if args.full else ""),
        "host": {
            "cpu": cpu,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "load_avg": list(os.getloadavg()),
        },
        "targets": {"hashes": 10**7, "memory_gb": 2, "lookups_per_s_one_core": 4000},
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
