"""Queue path benchmark: what Redis + Celery + publishing cost, measured in one run.

(a) Throughput of the queue path with a no-op pipeline (no fetch, no model: each key
    becomes an ``ok`` verdict at once) through a real redis-server and one
    ``modgate worker`` process, with 1-key and 64-key messages. Goal ≥ 10,000 keys/s
    with multi-key messages, so the broker never limits a GPU.
(b) End-to-end latency, enqueue → stream entry, p50/p99, at a fixed offered load of half
    the measured capacity, with the real ``open_nsfw`` detector fetching from a moto S3
    server.
(c) What one worker process pushes through the queue AND the real ``Pipeline`` (fetch from
    the moto S3 server, decode, the dynamic batcher at batch 64, aggregate, publish) with a
    no-op detector: once with decoding skipped (the header probe and decode budget still
    run: what is left on the CPU of a GPU node whose decode is on nvJPEG), once with PIL
    decoding small JPEGs. Besides keys/s, the worker's own CPU per key (from /proc), which
    says what one process needs of a core whatever else shares this machine.

(d) The split shape of a GPU node (``modgate serve-inference`` + ingest ``modgate worker``
    processes, ``--ingest N``): the same no-op detector behind a real inference process
    whose JPEG path probes the header and checks the decode budget but skips the decode
    (nvJPEG's part on a GPU). The figure that decides the design: the inference process's
    own CPU per key (its Python work per image: socket, batcher, replies) — one process
    per GPU, so 1000 ÷ that is the most keys/s it can hand a GPU — and the ingest
    processes' CPU per key, which says how many of them a GPU's target needs.

The queue is filled before the worker starts, and throughput is read from the stream
entry ids (Redis server time): (entries − 1) ÷ (last − first).

    python bench/bench_queue.py [--keys 20000] [--latency-s 20] [--pipeline-keys 6400]
                                [--ingest 2] [--only pipeline|split] [--out bench/results/queue.json]
"""

from __future__ import annotations

import argparse
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

from modgate import keys  # noqa: E402
from modgate.contract import MODERATE_QUEUE, MODERATE_TASK  # noqa: E402
from tests.servers import MotoServer, RedisServer, free_port  # noqa: E402


class NoopPipeline:
    """Stands in for the model pipeline: an ``ok`` verdict per key, immediately."""

    def __init__(self, settings: Any) -> None:
        from worker.judge.aggregator import assess

        self.policy = settings.policy
        self._loaded_ids: set[str] = set()
        self._categories = assess({}, self.policy, set()).categories

    def admission(self, cancel: Any = None) -> Any:
        import contextlib

        return contextlib.nullcontext(True)

    def submit(
        self, source: Any, request_id: str | None = None, policy: Any = None, cancel: Any = None
    ) -> Future:
        from modgate.verdict import Verdict, verdict_id

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
    from modgate.settings import load_settings
    from worker.service import celery_app

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


class NoopDetector:
    """A detector that costs nothing: what is left is the queue, fetch, decode, batcher,
    aggregation and publishing."""

    id = "noop"
    input = "image"
    min_side = 224
    draft_ok = True
    model = "noop"
    revision = "0"
    device = "cpu"

    def prepare(self, frame: Any) -> int:
        return 0

    def preparer(self) -> None:
        return None  # prepare runs in the worker process

    def infer(self, inputs: Any) -> list[Any]:
        from worker.detectors.base import DetectorOutput

        return [DetectorOutput({"nsfw": 0.0})] * len(inputs)


def header_only_decode(data: bytes, settings: Any, min_side: int, info: Any = None) -> Any:
    """Decoding skipped: the header probe and the decode budget run, as they do before a
    batch goes to nvJPEG; the frame is a constant 1×1 image."""
    from modgate.errors import ErrorCode, ModerationError
    from worker.ingest.decode import DecodedImage, Frame, check_budget
    from worker.ingest.probe import probe

    info = info if info is not None else probe(data)
    if info.format is None:
        raise ModerationError(ErrorCode.UNSUPPORTED_FORMAT, "not an image")
    check_budget(info, settings)
    return DecodedImage([Frame(_PIXEL, 1.0)], info.format, info.width, info.height, info.frame_count)


_PIXEL: Any = None


def serve_pipeline(decode: str) -> None:
    """Subprocess entry: ``modgate worker`` with the real Pipeline and the no-op detector."""
    global _PIXEL
    from PIL import Image

    from modgate.settings import load_settings
    from worker import pipeline
    from worker.detectors import LoadedDetectors
    from worker.service import celery_app

    if decode == "skip":
        if not hasattr(pipeline, "decode_image"):
            raise SystemExit("worker.pipeline no longer calls decode_image: update header_only_decode")
        _PIXEL = Image.new("RGB", (1, 1))
        pipeline.decode_image = header_only_decode  # type: ignore[attr-defined]
    settings = load_settings()

    def factory(s: Any) -> Any:
        return pipeline.Pipeline(s, LoadedDetectors([NoopDetector()], {}))  # type: ignore[list-item]

    app = celery_app.create_app(settings, pipeline_factory=factory)
    celery_app.set_app(app)
    threads = str(settings.worker.threads(settings.batch.max_batch))
    app.worker_main(
        [
            *("worker", "-Q", MODERATE_QUEUE, "--pool", "threads", "-c", threads, "-l", "INFO"),
            *("--without-gossip", "--without-mingle"),
        ]
    )


class RemoteNoopDetector(NoopDetector):
    def preparer(self) -> Any:
        # A registered preparer (ingest processes build it by name, worker.detectors.PREPARERS);
        # it is never called here: every key takes the JPEG path of the inference process.
        from worker.detectors.open_nsfw import prepare_frame

        return prepare_frame


def serve_noop_inference(socket: str) -> None:
    """Subprocess entry: ``modgate serve-inference`` with the no-op detector and a JPEG path
    that probes and budgets the header and skips the decode (nvJPEG's part on a GPU)."""
    from concurrent.futures import Future

    from modgate.errors import ModerationError
    from modgate.settings import load_settings
    from worker.detectors import LoadedDetectors
    from worker.device.engine import InferredImage, LocalEngine, PreparedFrame
    from worker.device.engine_server import InferenceServer
    from worker.ingest.decode import check_budget
    from worker.ingest.probe import probe
    from worker.observe.logs import setup_logging

    class HeaderOnlyEngine(LocalEngine):
        def submit_jpeg(self, data: bytes, cancel: Any = None) -> Future:
            out: Future = Future()
            try:
                info = probe(data)
                check_budget(info, settings.decode)
            except ModerationError as exc:
                out.set_result(exc)
                return out

            def inferred(f: Future) -> None:
                out.set_result(
                    InferredImage("JPEG", info.width or 0, info.height or 0, 1, 0.0, 0.0, f.result())
                )

            self.submit_frame(PreparedFrame(None, {"noop": 0})).add_done_callback(inferred)
            return out

    settings = load_settings(decode={"backend": "pil"})
    setup_logging("text")
    engine = HeaderOnlyEngine(settings, LoadedDetectors([RemoteNoopDetector()], {}))  # type: ignore[list-item]
    engine.tensor = True
    server = InferenceServer(Path(socket), engine)
    server.start()
    import threading

    threading.Event().wait()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sample_until_published(
    r: Any, total_keys: int, pids: dict[str, int], alive: Any
) -> list[tuple[int, dict[str, float], float]]:
    """Poll until ``total_keys`` verdicts are on the stream: (stream length, CPU seconds of
    each named process, time) every half second."""
    samples = []
    deadline = time.monotonic() + 900
    while (n := r.xlen(keys.VERDICT_STREAM)) < total_keys and time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("a process died")
        samples.append((n, {name: cpu_seconds(pid) for name, pid in pids.items()}, time.monotonic()))
        time.sleep(0.5)
    return samples


def stream_span(r: Any) -> tuple[int, float, dict[str, int]]:
    """Entries on the stream, seconds between the first and the last (Redis server time),
    and the statuses of the first 200."""
    first = r.xrange(keys.VERDICT_STREAM, count=1)[0][0]
    last = r.xrevrange(keys.VERDICT_STREAM, count=1)[0][0]
    statuses: dict[str, int] = {}
    for _, f in r.xrange(keys.VERDICT_STREAM, count=200):
        status = json.loads(f[b"verdict"])["status"]
        statuses[status] = statuses.get(status, 0) + 1
    seconds = max(1e-3, (entry_ms(last) - entry_ms(first)) / 1000.0)
    return r.xlen(keys.VERDICT_STREAM), seconds, statuses


def core_ms_per_key(samples: list[tuple[int, dict[str, float], float]], total_keys: int) -> dict[str, float]:
    """CPU per key of each process over the middle of the run (10 %–90 % of the keys
    published), and the wall rate there."""
    mid = [s for s in samples if total_keys * 0.1 <= s[0] <= total_keys * 0.9]
    if len(mid) < 2:
        return {}
    a, b = mid[0], mid[-1]
    done = b[0] - a[0]
    out = {name: round(1000 * (b[1][name] - a[1][name]) / done, 3) for name in a[1]}
    out["wall_keys_per_s_mid"] = round(done / (b[2] - a[2]), 1)
    return out


def pipeline_push(
    redis_url: str, r: Any, moto: MotoServer, redis_pid: int, total_keys: int, decode: str, workdir: Path
) -> dict[str, Any]:
    """Keys/s through one worker process with the real Pipeline and a no-op detector at
    batch 64, fed 64-key messages from a filled queue; objects are 640×480 JPEGs on moto."""
    r.flushall()
    app = producer(redis_url)
    t = time.perf_counter()
    fill(app, total_keys, 64, bucket="push", etag=None)
    fill_s = time.perf_counter() - t
    env = {
        "MODGATE_REDIS__URL": redis_url,
        "MODGATE_S3__ENDPOINT_URL": moto.url,
        "MODGATE_BATCH__MAX_BATCH": "64",
        "MODGATE_WORKER__BUCKETS": '["push"]',
    }
    proc, base = start_worker(
        env, [sys.executable, __file__, "serve-pipeline", decode], workdir / f"push-{decode}.log"
    )
    try:
        wait_ready(base, proc)
        pids = {"worker": proc.pid, "moto": moto.proc.pid, "redis": redis_pid}
        samples = sample_until_published(r, total_keys, pids, lambda: proc.poll() is None)
        n, seconds, statuses = stream_span(r)
    finally:
        proc.terminate()
        proc.wait(60)
    per_key = core_ms_per_key(samples, total_keys)
    return {
        "decode": decode,
        "keys": n,
        "seconds": round(seconds, 3),
        "keys_per_s": round((n - 1) / seconds, 1),
        "core_ms_per_key": per_key,
        "worker_keys_per_core_s": round(1000 / per_key["worker"], 1) if per_key.get("worker") else None,
        "sampled_statuses": statuses,
        "enqueue_keys_per_s": round(total_keys / fill_s, 1),
    }


def split_push(
    redis_url: str, r: Any, moto: MotoServer, redis_pid: int, total_keys: int, ingest: int, workdir: Path
) -> dict[str, Any]:
    """Keys/s through ``ingest`` ingest processes feeding one inference process (no-op
    detector, decode skipped), and each kind of process's CPU per key."""
    r.flushall()
    app = producer(redis_url)
    fill(app, total_keys, 64, bucket="push", etag=None)
    socket = Path(tempfile.mkdtemp(prefix="mg-")) / "inference.sock"
    log = (workdir / "split-inference.log").open("ab")
    server = subprocess.Popen(
        [sys.executable, __file__, "serve-noop-inference", str(socket)], stdout=log, stderr=subprocess.STDOUT
    )
    env = {
        "MODGATE_REDIS__URL": redis_url,
        "MODGATE_S3__ENDPOINT_URL": moto.url,
        "MODGATE_BATCH__MAX_BATCH": "64",
        "MODGATE_WORKER__BUCKETS": '["push"]',
        "MODGATE_INFERENCE__SOCKET": str(socket),
    }
    workers = [
        start_worker(
            env,
            [sys.executable, "-m", "worker.cli", "worker", "-Q", MODERATE_QUEUE],
            workdir / f"split-ingest-{i}.log",
        )
        for i in range(ingest)
    ]
    try:
        for proc, base in workers:
            wait_ready(base, proc)
        pids = {"inference": server.pid, "moto": moto.proc.pid, "redis": redis_pid}
        pids |= {f"ingest_{i}": p.pid for i, (p, _) in enumerate(workers)}

        def alive() -> bool:
            return server.poll() is None and all(p.poll() is None for p, _ in workers)

        samples = sample_until_published(r, total_keys, pids, alive)
        n, seconds, statuses = stream_span(r)
    finally:
        for proc, _ in workers:
            proc.terminate()
        for proc, _ in workers:
            proc.wait(60)
        server.terminate()
        server.wait(60)
    per_key = core_ms_per_key(samples, total_keys)
    if per_key:
        per_key["ingest_all"] = round(sum(v for k, v in per_key.items() if k.startswith("ingest_")), 3)
    target = 2500
    return {
        "ingest_processes": ingest,
        "keys": n,
        "seconds": round(seconds, 3),
        "keys_per_s": round((n - 1) / seconds, 1),
        "core_ms_per_key": per_key,
        "inference_keys_per_core_s": round(1000 / per_key["inference"], 1)
        if per_key.get("inference")
        else None,
        "ingest_keys_per_core_s": round(1000 / per_key["ingest_all"], 1)
        if per_key.get("ingest_all")
        else None,
        "ingest_cores_for_target": round(target * per_key["ingest_all"] / 1000, 1)
        if per_key.get("ingest_all")
        else None,
        "target_keys_per_s": target,
        "sampled_statuses": statuses,
    }


class _Tracker:
    """At most ``inflight`` requests out; ``done`` once ``total`` have come back."""

    def __init__(self, total: int, inflight: int) -> None:
        import threading

        self.slots = threading.BoundedSemaphore(inflight)
        self.done = threading.Event()
        self._left = total
        self._lock = threading.Lock()

    def finished(self, _: Any) -> None:
        self.slots.release()
        with self._lock:
            self._left -= 1
            if self._left == 0:
                self.done.set()


def inference_direct(keys_per_size: int = 10_000) -> dict[str, Any]:
    """The inference process alone: this process sends JPEGs straight to it through
    ``RemoteEngine`` (512 in flight), no Celery, no S3 — its CPU per key for a small and a
    large upload (the large one crosses as a memfd)."""

    from modgate.settings import InferenceSettings
    from worker.device.engine_client import RemoteEngine
    from worker.device.wire import INLINE_MAX
    from worker.tools.bench import jpeg_bytes

    socket = Path(tempfile.mkdtemp(prefix="mg-")) / "inference.sock"
    server = subprocess.Popen(
        [sys.executable, __file__, "serve-noop-inference", str(socket)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    out: dict[str, Any] = {}
    try:
        engine = RemoteEngine(InferenceSettings(socket=socket, connect_timeout_s=120))
        for name, (w, h) in (("640x480", (640, 480)), ("2400x1800", (2400, 1800))):
            data = jpeg_bytes(w, h, 1)
            for _ in range(200):  # warm-up
                engine.submit_jpeg(data).result()
            tracker = _Tracker(keys_per_size, 512)
            c0, t0 = cpu_seconds(server.pid), time.perf_counter()
            for _ in range(keys_per_size):
                tracker.slots.acquire()
                engine.submit_jpeg(data).add_done_callback(tracker.finished)
            tracker.done.wait()
            c1, t1 = cpu_seconds(server.pid), time.perf_counter()
            core_ms = 1000 * (c1 - c0) / keys_per_size
            out[name] = {
                "jpeg_bytes": len(data),
                "transport": "inline" if len(data) < INLINE_MAX else "memfd",
                "keys_per_s": round(keys_per_size / (t1 - t0), 1),
                "inference_core_ms_per_key": round(core_ms, 3),
                "inference_keys_per_core_s": round(1000 / core_ms, 1),
            }
        engine.close()
    finally:
        server.terminate()
        server.wait(60)
    return out


def pipeline_inprocess(moto: MotoServer, total_keys: int, batch: int = 64) -> dict[str, Any]:
    """The same work without Celery, in this process: core-ms per key of the Fetcher alone
    (32 threads) and of the Pipeline (fetch, decode skipped or PIL, batcher, aggregate)."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from modgate.settings import load_settings
    from modgate.verdict import Source
    from worker import pipeline
    from worker.detectors import LoadedDetectors
    from worker.ingest.fetch import Fetcher

    global _PIXEL
    _PIXEL = Image.new("RGB", (1, 1))
    settings = load_settings(s3={"endpoint_url": moto.url}, batch={"max_batch": batch})
    sources = [
        Source(kind="s3", uri=f"s3://push/k/{i:08d}.jpg", bucket="push", key=f"k/{i:08d}.jpg")
        for i in range(total_keys)
    ]
    out: dict[str, Any] = {}
    fetcher = Fetcher(settings.s3)
    cpu = time.process_time()
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(fetcher.fetch, sources))
    out["fetch_only_core_ms_per_key"] = round(1000 * (time.process_time() - cpu) / total_keys, 3)
    real = pipeline.decode_image  # type: ignore[attr-defined]
    for mode, decode in (("decode_skipped", header_only_decode), ("pil_decode", real)):
        pipeline.decode_image = decode  # type: ignore[attr-defined]
        try:
            loaded = LoadedDetectors([NoopDetector()], {})  # type: ignore[list-item]
            with pipeline.Pipeline(settings, loaded) as pipe:
                list(pipe.moderate(sources[: 2 * batch]))  # warm-up: pools, connections
                cpu, wall = time.process_time(), time.perf_counter()
                verdicts = list(pipe.moderate(sources))
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        finally:
            pipeline.decode_image = real  # type: ignore[attr-defined]
        assert all(v.status == "ok" for v in verdicts), [v.error for v in verdicts if v.error][:1]
        out[f"pipeline_{mode}_core_ms_per_key"] = round(1000 * cpu / total_keys, 3)
        out[f"pipeline_{mode}_keys_per_s"] = round(total_keys / wall, 1)
    return out


def upload(moto: MotoServer, total_keys: int, distinct: int = 64) -> None:
    """``total_keys`` objects under push/k/…, ``distinct`` different 640×480 JPEGs, in
    parallel (moto answers one request per thread)."""
    from concurrent.futures import ThreadPoolExecutor

    import boto3

    s3 = boto3.client("s3", endpoint_url=moto.url)
    try:
        s3.create_bucket(Bucket="push")
    except s3.exceptions.BucketAlreadyOwnedByYou:
        return
    images = [jpeg(i) for i in range(distinct)]
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(
                lambda i: s3.put_object(Bucket="push", Key=f"k/{i:08d}.jpg", Body=images[i % distinct]),
                range(total_keys),
            )
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


def fill(app: Any, total_keys: int, per_message: int, bucket: str = "bench", etag: str | None = "e") -> None:
    with app.producer_or_acquire() as prod:
        for start in range(0, total_keys, per_message):
            items = [
                {"bucket": bucket, "key": f"k/{i:08d}.jpg", **({"etag": etag} if etag else {})}
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
    from worker.tools.bench import jpeg_bytes

    return jpeg_bytes(640, 480, seed)


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
    if sys.argv[1:2] == ["serve-pipeline"]:
        serve_pipeline(sys.argv[2])
        return
    if sys.argv[1:2] == ["serve-noop-inference"]:
        serve_noop_inference(sys.argv[2])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keys", type=int, default=20_000)
    parser.add_argument("--latency-s", type=float, default=20.0)
    parser.add_argument("--pipeline-keys", type=int, default=6400)
    parser.add_argument(
        "--only",
        choices=["queue", "latency", "pipeline", "split"],
        help="run one part; the others stay as in --out",
    )
    parser.add_argument("--ingest", type=int, default=2, help="ingest processes in the split part")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "queue.json")
    args = parser.parse_args()

    import redis

    run = {part: args.only in (None, part) for part in ("queue", "latency", "pipeline", "split")}
    result: dict[str, Any] = json.loads(args.out.read_text()) if args.only and args.out.is_file() else {}
    workdir = Path(tempfile.mkdtemp(prefix="modgate-bench-"))
    server = RedisServer(workdir)
    moto = MotoServer()
    r = redis.Redis.from_url(server.url)
    try:
        if run["queue"]:
            single = throughput(server.url, r, min(args.keys, 5000), 1, workdir)
            multi = throughput(server.url, r, args.keys, 64, workdir)
            result["queue_noop"] = {
                "one_key_messages": single,
                "64_key_messages": multi,
                "ratio_64_over_1": round(multi["keys_per_s"] / single["keys_per_s"], 2),
                "goal_keys_per_s": 10_000,
            }
        if run["latency"]:
            result["latency_half_load"] = latency(server.url, r, moto, args.latency_s, workdir)
        if run["pipeline"]:
            for k, v in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench")):
                os.environ.setdefault(k, v)
            os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
            upload(moto, args.pipeline_keys)
            assert server.proc is not None
            result["pipeline_push"] = {
                "what": "one worker process, real Pipeline (moto S3 fetch, batcher at 64), no-op detector, "
                "64-key messages, 640x480 JPEGs",
                "decode_skipped": pipeline_push(
                    server.url, r, moto, server.proc.pid, args.pipeline_keys, "skip", workdir
                ),
                "pil_decode": pipeline_push(
                    server.url, r, moto, server.proc.pid, args.pipeline_keys, "pil", workdir
                ),
            }
            # Without Celery: what the fetch and the Pipeline cost on their own.
            result["pipeline_push"]["in_process"] = pipeline_inprocess(moto, min(args.pipeline_keys, 2000))
        if run["split"]:
            for k, v in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench")):
                os.environ.setdefault(k, v)
            os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
            upload(moto, args.pipeline_keys)
            assert server.proc is not None
            result["split_push"] = {
                "what": "serve-inference (no-op detector, header probe + budget, decode skipped) fed by "
                "ingest modgate worker processes (moto S3 fetch, batcher at 64), 64-key messages, "
                "640x480 JPEGs",
                **split_push(server.url, r, moto, server.proc.pid, args.pipeline_keys, args.ingest, workdir),
                "inference_direct": inference_direct(),
            }
    finally:
        moto.stop()
        server.stop()
    result["machine"] = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    command = "python bench/bench_queue.py " + " ".join(sys.argv[1:])
    if args.only:  # the other parts' figures came from an earlier command
        result.setdefault("commands", {})[args.only] = command
    else:
        result["command"], result["commands"] = command, {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if run["queue"]:
        q = result["queue_noop"]
        print(
            f"queue path, no-op pipeline, 1-key messages : {q['one_key_messages']['keys_per_s']:>9.1f} keys/s"
        )
        print(
            f"queue path, no-op pipeline, 64-key messages: {q['64_key_messages']['keys_per_s']:>9.1f} keys/s"
            " (goal 10000)"
        )
    if run["latency"]:
        lat = result["latency_half_load"]
        print(
            f"open_nsfw end to end at {lat['offered_keys_per_s']} keys/s "
            f"(half of {lat['capacity_keys_per_s']}): "
            f"p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms"
        )
    if run["pipeline"]:
        for name, p in result["pipeline_push"].items():
            if isinstance(p, dict) and "keys_per_s" in p:
                per_key = p["core_ms_per_key"]
                print(
                    f"queue + Pipeline, no-op detector, {name:<15}: {p['keys_per_s']:>8.1f} keys/s; "
                    f"worker {per_key.get('worker')} core-ms/key (= {p['worker_keys_per_core_s']} keys "
                    f"per core-second), moto {per_key.get('moto')}, redis {per_key.get('redis')}"
                )
        print(f"without Celery: {result['pipeline_push']['in_process']}")
    if run["split"]:
        sp = result["split_push"]
        per_key = sp["core_ms_per_key"]
        print(
            f"split shape, {sp['ingest_processes']} ingest processes: {sp['keys_per_s']:.1f} keys/s; "
            f"inference process {per_key.get('inference')} core-ms/key "
            f"(= {sp['inference_keys_per_core_s']} keys per core-second), ingest {per_key.get('ingest_all')} "
            f"core-ms/key (= {sp['ingest_cores_for_target']} cores for {sp['target_keys_per_s']} keys/s), "
            f"moto {per_key.get('moto')}, redis {per_key.get('redis')}"
        )
        for size, d in sp["inference_direct"].items():
            print(
                f"inference process alone, {size} JPEG ({d['transport']}): {d['inference_core_ms_per_key']} "
                f"core-ms/key = {d['inference_keys_per_core_s']} keys per core-second"
            )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
