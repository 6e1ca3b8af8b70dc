"""PDQ bank index (worker/judge/bank_index.py): lookups per second on one core, and the
index's memory — steady and at its peak during every kind of change — at 10⁴, 10⁵ and 10⁶
random hashes (10⁷ with ``--full``: ~1.2 GB of index, ~3 min; not run in CI).

Per size, one index, in this order:

- ``build``: all hashes added in one call (a worker's start-up load);
- ``lookup``: single-hash searches at radius 31 on one thread, half of them near-duplicates
  of stored hashes at distance 0..31 (each must be found: checked), half random (no match),
  and a sample compared with a brute-force popcount scan (``exact``);
- ``grow``: 1 % more hashes, in batches of 0.1 % (through the delta, merged every few
  batches): the bank outgrows what it was built for;
- ``add_single`` / ``add_batch`` / ``remove_single``: one hash per call (``modgate banks
  add``, take-down feedback), 1,000 per call (a chunk of the changes stream); merges of the
  delta happen inside these calls and are part of the rate;
- ``merge``: one merge of a 1,000-row delta into the tables, on its own (lookups go on
  meanwhile on other threads);
- ``remove_half``: 52 % of the hashes removed, in batches of 1 % (dead rows leave the tables);
- ``refill``: as many new hashes added back, in batches of 5 % (each merged at once).

Memory of each phase (``phases``): ``peak_total_mib`` is the index's memory at its highest
during the phase, every transient included: the process's peak RSS during the phase (VmHWM,
reset before it through /proc/self/clear_refs) less what the process held outside the index
when it began (RSS less ``memory_bytes()``). What the bench itself allocates during a phase
(the batches, their hex strings) counts too, so it errs high. ``heap_peak_mib`` is the
tracemalloc peak of what was allocated during the phase (numpy temporaries and new arrays;
not pages of address space the index reserved beforehand and writes into).

    python bench/bench_banks.py [--full] [--lookups 5000] [--out bench/results/banks.json]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import gc
import json
import os
import platform
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from worker.judge.bank_index import PdqIndex, codes_to_hex, hex_to_codes  # noqa: E402

RADIUS = 31
MIB = 2**20


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux ≥ 4.0)
        return True
    except OSError:
        return False


def release_freed_memory() -> None:
    gc.collect()
    name = ctypes.util.find_library("c")
    if name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).malloc_trim(0)  # glibc: hand freed heap back, so RSS is what is used


def measure(index: PdqIndex, work: Callable[[], object]) -> dict:
    """Run ``work``; its seconds and the index's memory peak (see the module docstring)."""
    release_freed_memory()
    rss0 = status_bytes("VmRSS")
    outside = rss0 - index.memory_bytes()
    peak_resets = reset_peak_rss()
    tracemalloc.start()
    t = time.perf_counter()
    work()
    seconds = time.perf_counter() - t
    _, heap_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    hwm = status_bytes("VmHWM")
    out = {
        "seconds": round(seconds, 2),
        "peak_total_mib": round((hwm - outside) / MIB, 1) if peak_resets else None,
        "heap_peak_mib": round(heap_peak / MIB, 1),
        "index_mib_after": round(index.memory_bytes() / MIB, 1),
        "rss_peak_growth_mib": round((hwm - rss0) / MIB, 1) if peak_resets else None,
    }
    print("   ", json.dumps(out), flush=True)
    return out


def force_merge(index: PdqIndex) -> None:
    """The delta into the tables now (what an add does once the delta is full)."""
    with index._lock:
        index._merge(np.empty((0, 4), np.uint64))


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


def add_in_batches(index: PdqIndex, codes: np.ndarray, batch: int) -> None:
    for i in range(0, len(codes), batch):
        index.add_codes(codes[i : i + batch])


def bench_size(n: int, lookups: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    codes = random_codes(rng, n)
    index = PdqIndex()
    phases: dict[str, dict] = {}
    print(f"{n} hashes", flush=True)
    phases["build"] = measure(index, lambda: index.add_codes(codes))
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
    sample = min(100 if n <= 10**6 else 20, len(near))
    mismatches = 0
    for q in near[:sample] + far[:sample]:
        if {h for h, _ in index.search(q, RADIUS)} != brute(codes, hex_to_codes([q])[0], RADIUS):
            mismatches += 1

    grown = random_codes(rng, n // 100)
    phases["grow"] = measure(index, lambda: add_in_batches(index, grown, max(1, n // 1000)))

    # Updates, one at a time and in small batches.
    singles = codes_to_hex(random_codes(rng, 2000))
    t = time.perf_counter()
    for h in singles:
        index.add([h])
    add_single_s = time.perf_counter() - t
    batch = random_codes(rng, 20 * 1000)
    t = time.perf_counter()
    add_in_batches(index, batch, 1000)
    add_batch_s = time.perf_counter() - t
    victim_rows = rng.choice(n, 500, replace=False)
    victims = singles[:500] + codes_to_hex(codes[victim_rows])
    t = time.perf_counter()
    for h in victims:
        index.remove([h])
    remove_s = time.perf_counter() - t
    still = sum(1 for h in victims if h in index)
    t = time.perf_counter()
    after = [index.search(q, RADIUS) for q in near[:1000]]
    after_s = time.perf_counter() - t
    del after

    extra = random_codes(rng, 1000)
    index.add_codes(extra)
    phases["merge"] = measure(index, lambda: force_merge(index))

    # Half the bank removed (rows the updates above removed are skipped), then refilled.
    gone = np.zeros(n, bool)
    gone[: n // 2 + n // 50] = True

    def remove_half() -> None:
        step = max(1, n // 100)
        for i in range(0, int(gone.sum()), step):
            index.remove(codes_to_hex(codes[i : min(i + step, n // 2 + n // 50)]))

    phases["remove_half"] = measure(index, remove_half)
    refill = random_codes(rng, int(gone.sum()))
    phases["refill"] = measure(index, lambda: add_in_batches(index, refill, max(1, n // 20)))

    # Exact after all of it: the stored set is known, compare with brute force.
    gone[victim_rows] = True
    now = np.concatenate([codes[~gone], grown, hex_to_codes(singles[500:]), batch, extra, refill])
    end_mismatches = 0
    end_sample = min(50 if n <= 10**6 else 10, len(now))
    for k, i in enumerate(rng.integers(0, len(now), end_sample)):
        q = flip(now[i], k % (RADIUS + 1), rng)
        if {h for h, _ in index.search(codes_to_hex(q[None])[0], RADIUS)} != brute(now, q, RADIUS):
            end_mismatches += 1
    count_off_by = len(index) - len(now)
    del now

    result = {
        "hashes": n,
        "p_bits": index._snap.p,
        "build_s": phases["build"]["seconds"],
        "build_hashes_per_s": rate(n, phases["build"]["seconds"]),
        "memory": {
            "index_mib_after_build": round(built_bytes / MIB, 1),
            "index_mib_at_end": round(index.memory_bytes() / MIB, 1),
            "bytes_per_hash_after_build": round(built_bytes / n, 1),
            "peak_total_mib": max(p["peak_total_mib"] or 0 for p in phases.values()),
        },
        "phases": phases,
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
        "merge_s": phases["merge"]["seconds"],
        "add_single_per_s": rate(len(singles), add_single_s),
        "add_batch_1000_hashes_per_s": rate(len(batch), add_batch_s),
        "remove_single_per_s": rate(len(victims), remove_s),
        "removed_still_found": still,
        "exact": {
            "queries": 2 * sample + end_sample,
            "mismatches_vs_brute_force": mismatches + end_mismatches,
            "count_after_changes_off_by": count_off_by,
        },
    }
    print(json.dumps({k: v for k, v in result.items() if k != "phases"}), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="also 10⁷ hashes (~3 min, ~1.5 GB peak)")
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
