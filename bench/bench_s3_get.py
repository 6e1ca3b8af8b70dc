"""S3 GET cost: core-ms per object GET in the fetching process for the three clients
modgate could GET with — botocore's ``get_object``, the lean client (worker/ingest/s3_get.py)
and obstore (the Rust object_store crate; its tokio runtime runs on its own threads) —
side by side in one run: the same objects on the same moto server (its own process, so
its CPU is not counted), called synchronously from ``s3.max_concurrency`` threads as the
fetch pool calls its client. CPU time is ``time.process_time()``: the whole process,
every thread included (obstore's runtime threads too). Wall rates mostly say how fast
moto answers. Each round runs every client in turn; the median of the rounds is reported.
``fetcher`` rows are the same GETs through ``Fetcher.fetch`` (gate, GET, counted body
read) for the clients it can use.

``keys`` records which valid S3 keys each client GETs back intact: obstore maps keys onto
object_store paths, which refuse control characters, empty and ``.``/``..`` segments and
strip a leading ``/`` (another object's key).

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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modgate.settings import S3Settings  # noqa: E402
from modgate.verdict import Source  # noqa: E402
from tests.servers import MotoServer  # noqa: E402
from worker.ingest.fetch import Fetcher  # noqa: E402

BUCKET = "bench"
DISTINCT = 100  # objects uploaded; the GETs cycle over them
# A keep-alive front for moto, in its own process so its CPU is not counted.
PROXY = (
    "import sys, time; sys.path.insert(0, sys.argv[2]); from tests.faults.proxy import FaultProxy; "
    "p = FaultProxy(sys.argv[1]); print(p.url, flush=True); time.sleep(1e9)"
)


def one_round(get: Callable[[int], int], n: int, threads: int) -> tuple[float, float]:
    """(core-ms per GET, GETs per wall second) of ``n`` calls of ``get`` on ``threads``."""
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda _: None, range(threads)))  # threads started outside the timing
        cpu, wall = time.process_time(), time.perf_counter()
        sizes = list(pool.map(get, range(n)))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    assert all(size == sizes[0] for size in sizes), "a GET returned other bytes"
    return 1000 * cpu / n, n / wall


def key(i: int) -> str:
    return f"img/{i % DISTINCT:04d}.jpg"


def clients(url: str, threads: int) -> dict[str, Callable[[int], int]]:
    """name → one synchronous GET of object ``i`` returning its size."""
    import obstore
    from obstore.store import S3Store

    settings = S3Settings(endpoint_url=url, max_concurrency=threads)
    botocore = Fetcher(settings.model_copy(update={"get_client": "botocore"})).get_client
    lean = Fetcher(settings.model_copy(update={"get_client": "lean"})).get_client
    store = S3Store(
        BUCKET,
        endpoint=url,
        region="us-east-1",
        access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
        secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
        virtual_hosted_style_request=False,
        client_options={"allow_http": True, "pool_max_idle_per_host": str(threads)},
        retry_config={"max_retries": 0, "retry_timeout": timedelta(seconds=30)},
    )

    def via_boto(client: object) -> Callable[[int], int]:
        def get(i: int) -> int:
            body = client.get_object(Bucket=BUCKET, Key=key(i))["Body"]  # type: ignore[attr-defined]
            try:
                return sum(len(c) for c in body.iter_chunks(1 << 20))
            finally:
                body.close()

        return get

    def via_obstore(i: int) -> int:
        return len(obstore.get(store, key(i)).bytes())

    fetchers = {
        kind: Fetcher(settings.model_copy(update={"get_client": kind})) for kind in ("botocore", "lean")
    }

    def via_fetcher(fetcher: Fetcher) -> Callable[[int], int]:
        def get(i: int) -> int:
            source = Source(kind="s3", uri=f"s3://{BUCKET}/{key(i)}", bucket=BUCKET, key=key(i))
            return len(fetcher.fetch(source).data)

        return get

    return {
        "botocore": via_boto(botocore),
        "lean": via_boto(lean),
        "obstore": via_obstore,
        "fetcher_botocore": via_fetcher(fetchers["botocore"]),
        "fetcher_lean": via_fetcher(fetchers["lean"]),
    }


# Valid S3 keys a client must GET as they are (modgate moderates whatever was uploaded).
ODD_KEYS = [
    "plain.jpg",
    "ünï/çødé 😀.jpg",
    "ctl\x01.jpg",
    "tab\t.jpg",
    "a//b.jpg",
    "/lead.jpg",
    "x/./y.jpg",
    "x/../y.jpg",
]


def key_check(url: str, s3: object) -> dict[str, dict[str, str]]:
    """client → key → "ok" or what it did instead (each key's body is unique)."""
    import obstore
    from obstore.store import S3Store

    for k in ODD_KEYS:
        s3.put_object(Bucket=BUCKET, Key=k, Body=k.encode())  # type: ignore[attr-defined]
    s3.put_object(Bucket=BUCKET, Key="lead.jpg", Body=b"another object")  # type: ignore[attr-defined]
    store = S3Store(
        BUCKET,
        endpoint=url,
        region="us-east-1",
        virtual_hosted_style_request=False,
        client_options={"allow_http": True},
        retry_config={"max_retries": 0},
    )
    lean = Fetcher(S3Settings(endpoint_url=url, get_client="lean")).get_client
    gets = {
        "lean": lambda k: lean.get_object(Bucket=BUCKET, Key=k)["Body"].read(),
        "obstore": lambda k: bytes(obstore.get(store, k).bytes()),
    }
    out: dict[str, dict[str, str]] = {}
    for name, get in gets.items():
        out[name] = {}
        for k in ODD_KEYS:
            try:
                data = get(k)
                out[name][repr(k)] = "ok" if data == k.encode() else f"other bytes: {data[:20]!r}"
            except Exception as exc:
                out[name][repr(k)] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return out


def measure(url: str, args: argparse.Namespace) -> dict[str, list[tuple[float, float]]]:
    gets = clients(url, args.threads)
    for get in gets.values():  # warm-up: client creation, imports, pools, connections
        one_round(get, 200, args.threads)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in gets}
    for _ in range(args.rounds):
        for name, get in gets.items():
            runs[name].append(one_round(get, args.gets, args.threads))
            cpu, rate = runs[name][-1]
            print(f"{url} {name}: {cpu:.3f} core-ms/GET, {rate:.0f} GETs/s", flush=True)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gets", type=int, default=2000)
    parser.add_argument("--size", type=int, default=60_000)
    parser.add_argument("--threads", type=int, default=S3Settings().max_concurrency)
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
            s3.put_object(Bucket=BUCKET, Key=key(i), Body=body)
        proxy = subprocess.Popen(
            [sys.executable, "-c", PROXY, moto.url, str(ROOT)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert proxy.stdout is not None
            urls = {"direct": moto.url, "keepalive": proxy.stdout.readline().strip()}
            runs = {scenario: measure(url, args) for scenario, url in urls.items()}
            keys = key_check(moto.url, s3)
        finally:
            proxy.terminate()
            proxy.wait(10)
    finally:
        moto.stop()

    import obstore

    result: dict[str, object] = {
        "what": f"{args.gets} GETs of {args.size} B objects, {args.threads} threads calling the client "
        "synchronously, moto",
        "metric": "core-ms per GET in the fetching process, all its threads (time.process_time), "
        "median of rounds",
        "rounds": args.rounds,
        "command": "python bench/bench_s3_get.py " + " ".join(sys.argv[1:]),
        "host": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "obstore": obstore.__version__,
            "load_avg": os.getloadavg(),
        },
    }
    for scenario, by_name in runs.items():
        out: dict[str, object] = {}
        for name, values in by_name.items():
            out[name] = {
                "core_ms_per_get": round(statistics.median(v[0] for v in values), 3),
                "core_ms_per_get_rounds": [round(v[0], 3) for v in values],
                "gets_per_s_rounds": [round(v[1], 1) for v in values],
            }

        ms = {name: out[name]["core_ms_per_get"] for name in by_name}  # type: ignore[index]
        for a, b in (("lean", "botocore"), ("obstore", "lean"), ("obstore", "botocore")):
            out[f"{a}_over_{b}"] = round(ms[a] / ms[b], 3)
        result[scenario] = out
    result["keys"] = keys
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
