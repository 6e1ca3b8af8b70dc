"""S3 GET cost: core-ms of Python per object GET in the fetching process, botocore's
client vs the lean one (worker/s3_get.py), through ``Fetcher.fetch`` (the real hot path:
gate, GET, counted body read) with 32 threads against a moto server (its own process, so
its CPU is not counted). CPU time per key is the metric: the machine may be shared, and
wall rates mostly say how fast moto answers. Each round alternates the clients; the
median of the rounds is reported.

Two ways to reach moto: ``direct`` (moto closes every connection, so each GET also
connects, which S3 does not make clients do) and ``keepalive`` (through the fault proxy
of the test suite, in a child process, which keeps client connections open as S3 does).

    python bench/bench_s3_get.py [--gets 2000] [--size 60000] [--rounds 3] [--out bench/results/s3_get.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.servers import MotoServer  # noqa: E402
from worker.fetch import Fetcher  # noqa: E402
from worker.settings import S3Settings  # noqa: E402
from worker.verdict import Source  # noqa: E402

BUCKET = "bench"
DISTINCT = 100  # objects uploaded; the GETs cycle over them
# A keep-alive front for moto, in its own process so its CPU is not counted.
PROXY = (
    "import sys, time; sys.path.insert(0, sys.argv[2]); from tests.faults.proxy import FaultProxy; "
    "p = FaultProxy(sys.argv[1]); print(p.url, flush=True); time.sleep(1e9)"
)


def one_round(fetcher: Fetcher, sources: list[Source], threads: int) -> tuple[float, float]:
    """(core-ms per GET, GETs per wall second)."""
    cpu, wall = time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        sizes = [len(f.data) for f in pool.map(fetcher.fetch, sources)]
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    assert all(size == sizes[0] for size in sizes)
    return 1000 * cpu / len(sources), len(sources) / wall


def measure(
    url: str, sources: list[Source], args: argparse.Namespace
) -> dict[str, list[tuple[float, float]]]:
    fetchers = {
        kind: Fetcher(S3Settings(endpoint_url=url, get_client=kind, max_concurrency=args.threads))
        for kind in ("botocore", "lean")
    }
    for fetcher in fetchers.values():  # warm-up: client creation, imports, pools
        one_round(fetcher, sources[:200], args.threads)
    runs: dict[str, list[tuple[float, float]]] = {kind: [] for kind in fetchers}
    for _ in range(args.rounds):
        for kind, fetcher in fetchers.items():
            runs[kind].append(one_round(fetcher, sources, args.threads))
            cpu, rate = runs[kind][-1]
            print(f"{url} {kind}: {cpu:.3f} core-ms/GET, {rate:.0f} GETs/s", flush=True)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gets", type=int, default=2000)
    parser.add_argument("--size", type=int, default=60_000)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "s3_get.json")
    args = parser.parse_args()

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    moto = MotoServer()
    try:
        import boto3

        s3 = boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        body = os.urandom(args.size)
        for i in range(DISTINCT):
            s3.put_object(Bucket=BUCKET, Key=f"img/{i:04d}.jpg", Body=body)
        sources = [
            Source(
                kind="s3",
                uri=f"s3://{BUCKET}/img/{i % DISTINCT:04d}.jpg",
                bucket=BUCKET,
                key=f"img/{i % DISTINCT:04d}.jpg",
            )
            for i in range(args.gets)
        ]
        proxy = subprocess.Popen(
            [sys.executable, "-c", PROXY, moto.url, str(ROOT)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert proxy.stdout is not None
            urls = {"direct": moto.url, "keepalive": proxy.stdout.readline().strip()}
            runs = {scenario: measure(url, sources, args) for scenario, url in urls.items()}
        finally:
            proxy.terminate()
            proxy.wait(10)
    finally:
        moto.stop()

    result: dict[str, object] = {
        "what": f"{args.gets} GETs of {args.size} B objects via Fetcher.fetch, {args.threads} threads, moto",
        "metric": "core-ms per GET in the fetching process (time.process_time), median of rounds",
        "rounds": args.rounds,
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_avg": os.getloadavg()},
    }
    for scenario, by_kind in runs.items():
        out: dict[str, object] = {}
        for kind, values in by_kind.items():
            out[kind] = {
                "core_ms_per_get": round(statistics.median(v[0] for v in values), 3),
                "core_ms_per_get_rounds": [round(v[0], 3) for v in values],
                "gets_per_s_rounds": [round(v[1], 1) for v in values],
            }
        out["lean_over_botocore"] = round(
            out["lean"]["core_ms_per_get"] / out["botocore"]["core_ms_per_get"],  # type: ignore[index]
            3,
        )
        result[scenario] = out
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
