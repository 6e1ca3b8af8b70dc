"""Queue path benchmark: what Redis + Celery + publishing cost, measured in one run.

(a) Throughput of the queue path with a no-op pipeline (no fetch, no model: each key
    becomes an ``ok`` verdict at once) through a real redis-server and one
    ``modgate worker`` process, with 1-key and 64-key messages. Goal ≥ 10,000 keys/s
    with multi-key messages, so the broker never limits a GPU.
(b) End-to-end latency, enqueue → stream entry, p50/p99, at a fixed offered load of half
    the measured capacity, with the real ``open_nsfw`` detector fetching from a moto S3
    server.

The queue is filled before the worker starts, and throughput is read from the stream
entry ids (Redis server time): (entries − 1) ÷ (last − first).

    python bench/bench_queue.py [--keys 20000] [--latency-s 20] [--out bench/results/queue.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.servers import MotoServer, RedisServer, free_port  # noqa: E402
from worker import keys  # noqa: E402
from worker.contract import MODERATE_QUEUE, MODERATE_TASK  # noqa: E402


class NoopPipeline:
    """Stands in for the model pipeline: an ``ok`` verdict per key, immediately."""

    def __init__(self, settings: Any) -> None:
        from worker.aggregator import assess

        self.policy = settings.policy
        self._loaded_ids: set[str] = set()
        self._categories = assess({}, self.policy, set()).categories

    def submit(self, source: Any, request_id: str | None = None, policy: Any = None) -> Future:
        from worker.verdict import Verdict, verdict_id

        policy = policy or self.policy
        future: Future = Future()
        future.set_result(
            Verdict(
                id=verdict_id(source, policy.version),
                source=source,
                status="ok",
                decision="safe",
                categories=self._categories,
                policy_version=policy.version,
                request_id=request_id,
            )
        )
        return future

    def alive(self) -> bool:
        return True

    def close(self) -> None:
        pass


def serve_noop() -> None:
    """Subprocess entry: ``modgate worker`` with the no-op pipeline."""
    from worker import celery_app
    from worker.settings import load_settings

    settings = load_settings()
    app = celery_app.create_app(settings, pipeline_factory=NoopPipeline)
    celery_app.set_app(app)
    threads = str(settings.worker.threads(settings.batch.max_batch))
    app.worker_main(
        [
            "worker",
            "-Q",
            MODERATE_QUEUE,
            "--pool",
            "threads",
            "-c",
            threads,
            "-l",
            "INFO",
            "--without-gossip",
            "--without-mingle",
        ]
    )


def start_worker(env: dict[str, str], args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    full_env = {
        **os.environ,
        **env,
        "MODGATE_WORKER__METRICS_PORT": str(port),
        "MODGATE_WORKER__LOG_FORMAT": "text",
    }
    proc = subprocess.Popen(args, env=full_env, stdout=log.open("ab"), stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("worker exited during start-up")
        try:
            if urllib.request.urlopen(base + "/readyz", timeout=1).status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("worker not ready")


def producer(redis_url: str) -> Any:
    from celery import Celery

    app = Celery(broker=redis_url, set_as_current=False)
    app.conf.task_serializer = "json"
    return app


def fill(app: Any, total_keys: int, per_message: int, bucket: str = "bench") -> None:
    with app.producer_or_acquire() as prod:
        for start in range(0, total_keys, per_message):
            items = [
                {"bucket": bucket, "key": f"k/{i:08d}.jpg", "etag": "e"}
                for i in range(start, min(total_keys, start + per_message))
            ]
            app.send_task(MODERATE_TASK, args=[{"items": items}], queue=MODERATE_QUEUE, producer=prod)


def entry_ms(entry_id: bytes) -> int:
    return int(entry_id.split(b"-")[0])


def throughput(redis_url: str, r: Any, total_keys: int, per_message: int, workdir: Path) -> dict[str, Any]:
    r.flushall()
    app = producer(redis_url)
    t = time.perf_counter()
    fill(app, total_keys, per_message)
    fill_s = time.perf_counter() - t
    proc, _ = start_worker(
        {"MODGATE_REDIS__URL": redis_url},
        [sys.executable, __file__, "serve-noop"],
        workdir / f"noop-{per_message}.log",
    )
    try:
        deadline = time.monotonic() + 600
        while r.xlen(keys.VERDICT_STREAM) < total_keys and time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError("worker died")
            time.sleep(0.2)
        first = r.xrange(keys.VERDICT_STREAM, count=1)[0][0]
        last = r.xrevrange(keys.VERDICT_STREAM, count=1)[0][0]
        n = r.xlen(keys.VERDICT_STREAM)
    finally:
        proc.terminate()
        proc.wait(60)
    seconds = max(1e-3, (entry_ms(last) - entry_ms(first)) / 1000.0)
    return {
        "keys": n,
        "keys_per_message": per_message,
        "seconds": round(seconds, 3),
        "keys_per_s": round((n - 1) / seconds, 1),
        "enqueue_keys_per_s": round(total_keys / fill_s, 1),
    }


def jpeg(seed: int) -> bytes:
    from worker.samples import photo

    buf = io.BytesIO()
    photo(640, 480, seed).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def latency(redis_url: str, r: Any, moto: MotoServer, seconds: float, workdir: Path) -> dict[str, Any]:
    import boto3

    env = {
        "MODGATE_REDIS__URL": redis_url,
        "MODGATE_S3__ENDPOINT_URL": moto.url,
        "MODGATE_DETECTORS__ENABLED": '["open_nsfw"]',
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    s3 = boto3.client("s3", endpoint_url=moto.url)
    s3.create_bucket(Bucket="lat")
    images = [jpeg(i) for i in range(64)]
    app = producer(redis_url)
    proc, base = start_worker(
        env, [sys.executable, "-m", "worker.cli", "worker", "-Q", MODERATE_QUEUE], workdir / "lat.log"
    )
    try:
        wait_ready(base, proc)
        # Capacity: a backlog of one-key messages, drained as fast as the worker can.
        r.delete(keys.VERDICT_STREAM)
        backlog = 192
        for i in range(backlog):
            s3.put_object(Bucket="lat", Key=f"cap/{i}.jpg", Body=images[i % len(images)])
        for i in range(backlog):
            app.send_task(
                MODERATE_TASK,
                args=[{"items": [{"bucket": "lat", "key": f"cap/{i}.jpg"}]}],
                queue=MODERATE_QUEUE,
            )
        while r.xlen(keys.VERDICT_STREAM) < backlog:
            time.sleep(0.1)
        entries = r.xrange(keys.VERDICT_STREAM)
        capacity = (len(entries) - 1) / max(
            1e-3, (entry_ms(entries[-1][0]) - entry_ms(entries[0][0])) / 1000.0
        )

        # Latency at half that load, Poisson arrivals; request_id carries the send time.
        rate = capacity / 2
        count = int(rate * seconds)
        for i in range(count):
            s3.put_object(Bucket="lat", Key=f"lat/{i}.jpg", Body=images[i % len(images)])
        r.delete(keys.VERDICT_STREAM)
        sent = {}
        start = time.time()
        next_at = start
        for i in range(count):
            next_at += random.expovariate(rate)
            pause = next_at - time.time()
            if pause > 0:
                time.sleep(pause)
            sent[f"lat-{i}"] = time.time()
            app.send_task(
                MODERATE_TASK,
                args=[{"items": [{"bucket": "lat", "key": f"lat/{i}.jpg"}], "request_id": f"lat-{i}"}],
                queue=MODERATE_QUEUE,
            )
        while r.xlen(keys.VERDICT_STREAM) < count:
            time.sleep(0.1)
        lat = sorted(
            entry_ms(eid) / 1000.0 - sent[json.loads(f[b"verdict"])["request_id"]]
            for eid, f in r.xrange(keys.VERDICT_STREAM)
        )
    finally:
        proc.terminate()
        proc.wait(60)

    def pct(p: float) -> float:
        return round(1000 * lat[min(len(lat) - 1, int(p * len(lat)))], 1)

    return {
        "detector": "open_nsfw",
        "capacity_keys_per_s": round(capacity, 2),
        "offered_keys_per_s": round(rate, 2),
        "messages": count,
        "p50_ms": pct(0.50),
        "p90_ms": pct(0.90),
        "p99_ms": pct(0.99),
        "max_ms": round(1000 * lat[-1], 1),
    }


def main() -> None:
    if sys.argv[1:2] == ["serve-noop"]:
        serve_noop()
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keys", type=int, default=20_000)
    parser.add_argument("--latency-s", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "queue.json")
    args = parser.parse_args()

    import redis

    workdir = Path(tempfile.mkdtemp(prefix="modgate-bench-"))
    server = RedisServer(workdir)
    moto = MotoServer()
    r = redis.Redis.from_url(server.url)
    try:
        single = throughput(server.url, r, min(args.keys, 5000), 1, workdir)
        multi = throughput(server.url, r, args.keys, 64, workdir)
        lat = latency(server.url, r, moto, args.latency_s, workdir)
    finally:
        moto.stop()
        server.stop()
    result = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "queue_noop": {
            "one_key_messages": single,
            "64_key_messages": multi,
            "ratio_64_over_1": round(multi["keys_per_s"] / single["keys_per_s"], 2),
            "goal_keys_per_s": 10_000,
        },
        "latency_half_load": lat,
        "command": "python bench/bench_queue.py " + " ".join(sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"queue path, no-op pipeline, 1-key messages : {single['keys_per_s']:>9.1f} keys/s")
    print(f"queue path, no-op pipeline, 64-key messages: {multi['keys_per_s']:>9.1f} keys/s (goal 10000)")
    print(
        f"open_nsfw end to end at {lat['offered_keys_per_s']} keys/s (half of {lat['capacity_keys_per_s']}): "
        f"p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
