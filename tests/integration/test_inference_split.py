"""The split shape of a GPU node, on CPU: one ``modgate serve-inference`` process owns the
models; ``modgate worker`` ingest processes (real Celery workers on a real redis-server,
fetching from moto over HTTP) send it JPEG bytes and prepared inputs over its Unix socket.

The verdicts must be the ones a single process gives, every key must get exactly one, and
a restart of the inference process in the middle of a backlog must cost no verdict."""

from __future__ import annotations

import io
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import redis
from celery import Celery
from PIL import Image

from modgate import keys
from tests.helpers import jpeg, verdicts, wait_for
from tests.servers import InferenceProcess

DETECTORS = '["open_nsfw"]'


@pytest.fixture
def r(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    return client


@pytest.fixture
def send(redis_server):
    app = Celery(broker=redis_server.url, set_as_current=False)
    app.conf.task_serializer = "json"

    def send(bucket: str, keys_: list[str]) -> None:
        app.send_task(
            "modgate.moderate",
            args=[{"items": [{"bucket": bucket, "key": k} for k in keys_]}],
            queue="modgate",
        )

    yield send
    app.close()


@pytest.fixture
def socket_dir():
    # A Unix socket path must stay under ~100 bytes: pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="mg-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def inference(socket_dir, tmp_path):
    started: list[InferenceProcess] = []
    env = {
        "MODGATE_DETECTORS__ENABLED": DETECTORS,
        # The tensor decode path (nvJPEG on a GPU) runs in the inference process.
        "MODGATE_DECODE__BACKEND": "tensor",
        "MODGATE_BATCH__MAX_WAIT_MS": "20",
        "MODGATE_WORKER__LOG_FORMAT": "text",
    }

    def start() -> InferenceProcess:
        p = InferenceProcess(env, socket_dir / "inference.sock", tmp_path / f"inference-{len(started)}.log")
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


@pytest.fixture
def ingest_env(s3_env, redis_server, socket_dir):
    return {
        **s3_env,
        "MODGATE_REDIS__URL": redis_server.url,
        "MODGATE_INFERENCE__SOCKET": str(socket_dir / "inference.sock"),
        "MODGATE_BATCH__MAX_WAIT_MS": "20",
    }


def mixed_objects() -> dict[str, bytes]:
    """JPEGs for the tensor path, and what it hands back to the ingest process's PIL path."""
    objects = {f"photo/{i:02d}.jpg": jpeg(i, 480, 360) for i in range(8)}
    # Above wire.INLINE_MAX: its bytes cross in a memfd, mapped by the server.
    objects["photo/large.jpg"] = large = jpeg(60, 2400, 1800)
    assert len(large) > 128 * 1024
    # Turned by its EXIF orientation: also hashed as stored (pdq_file, ThreatExchange's).
    rotated, exif = io.BytesIO(), Image.Exif()
    exif[0x0112] = 6
    Image.open(io.BytesIO(jpeg(61, 640, 480))).save(rotated, "JPEG", exif=exif.tobytes())
    objects["photo/rotated.jpg"] = rotated.getvalue()
    png = io.BytesIO()
    Image.open(io.BytesIO(jpeg(20))).save(png, "PNG")
    objects["other/image.png"] = png.getvalue()
    gif = io.BytesIO()
    frames = [Image.open(io.BytesIO(jpeg(30 + i))).convert("P") for i in range(3)]
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=50)
    objects["other/anim.gif"] = gif.getvalue()
    cmyk = io.BytesIO()
    Image.open(io.BytesIO(jpeg(40))).convert("CMYK").save(cmyk, "JPEG")
    objects["other/cmyk.jpg"] = cmyk.getvalue()
    objects["bad/truncated.jpg"] = jpeg(50)[:400]
    objects["bad/text.jpg"] = b"not an image at all"
    return objects


def reference_scores(objects: dict[str, bytes], tmp_path: Path) -> dict[str, dict]:
    """What one process with the models gives on the same bytes."""
    from modgate.settings import load_settings
    from modgate.verdict import Source
    from worker.pipeline import Pipeline

    root = tmp_path / "ref"
    for key, data in objects.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)
    settings = load_settings(detectors={"enabled": ["open_nsfw"]}, decode={"backend": "tensor"})
    sources = [Source(kind="file", uri=str(root / key)) for key in objects]
    with Pipeline(settings) as pipe:
        out = {}
        for v in pipe.moderate(sources):
            key = str(Path(v.source.uri).relative_to(root))
            out[key] = {
                "status": v.status,
                "scores": v.detectors["open_nsfw"].scores if v.detectors else None,
                "pdq": (v.hashes.pdq, v.hashes.pdq_quality) if v.hashes else None,
                "pdq_file": (v.hashes.pdq_file, v.hashes.pdq_file_quality) if v.hashes else None,
            }
            out[key]["code"] = v.error.code if v.error else None
    return out


def test_ingest_processes_share_one_inference_process(
    inference, ingest_env, workers, r, send, s3_client, bucket, tmp_path
):
    objects = mixed_objects()
    for key, data in objects.items():
        s3_client.put_object(Bucket=bucket, Key=key, Body=data)
    server = inference()
    ingest = [workers(ingest_env, name=f"ingest{i}", queues="modgate") for i in range(2)]
    keys_ = sorted(objects)
    for key in keys_:  # one-key messages: both ingest processes take some
        send(bucket, [key])
    wait_for(lambda: r.xlen(keys.VERDICT_STREAM) >= len(keys_), what="verdicts")
    time.sleep(1.0)  # a duplicate would show up now

    got = {v["source"]["key"]: v for v in verdicts(r)}
    assert r.xlen(keys.VERDICT_STREAM) == len(keys_) and set(got) == set(keys_)
    ref = reference_scores(objects, tmp_path)
    for key in keys_:
        v = got[key]
        assert v["status"] == ref[key]["status"], (key, v.get("error"))
        if v["status"] == "ok":
            scores = v["detectors"]["open_nsfw"]["scores"]
            assert scores == pytest.approx(ref[key]["scores"], abs=1e-4), key
            assert v["detectors"]["open_nsfw"]["model"]  # named by the inference process's metadata
            # JPEGs hashed where the inference process decoded them, the rest in ingest: the
            # one-process hashes either way.
            assert (v["hashes"]["pdq"], v["hashes"]["pdq_quality"]) == ref[key]["pdq"], key
            assert (v["hashes"]["pdq_file"], v["hashes"]["pdq_file_quality"]) == ref[key]["pdq_file"], key
        else:
            assert v["error"]["code"] == ref[key]["code"], key
    assert got["other/anim.gif"]["frames"] > 1  # frames prepared in the ingest process
    from threatexchange.signal_type.pdq.pdq_hasher import pdq_from_bytes

    stored = got["photo/rotated.jpg"]["hashes"]
    assert (stored["pdq_file"], stored["pdq_file_quality"]) == pdq_from_bytes(objects["photo/rotated.jpg"])
    assert got["photo/00.jpg"]["hashes"]["pdq_file"] is None  # upright
    assert {k for k, v in got.items() if v["status"] == "error"} == {"bad/truncated.jpg", "bad/text.jpg"}

    # Both kinds of process say where the models run; the ingest ones learnt it on connect.
    assert server.readyz()["devices"] == {"open_nsfw": "cpu"}
    import json
    import urllib.request

    for w in ingest:
        state = json.loads(urllib.request.urlopen(w.base + "/readyz", timeout=5).read())
        assert state["devices"] == {"open_nsfw": "cpu"} and state["detectors"] == ["open_nsfw"]


def test_a_restarted_inference_process_costs_no_verdict(
    inference, ingest_env, workers, r, send, s3_client, bucket
):
    n = 48
    for i in range(n):
        s3_client.put_object(Bucket=bucket, Key=f"k/{i:03d}.jpg", Body=jpeg(i, 640, 480))
    server = inference()
    ingest = workers(ingest_env, name="ingest", queues="modgate")
    for start in range(0, n, 4):
        send(bucket, [f"k/{i:03d}.jpg" for i in range(start, start + 4)])
    wait_for(lambda: r.xlen(keys.VERDICT_STREAM) >= 4, what="first verdicts")
    server.kill()  # kill -9 with requests in flight
    time.sleep(1.0)
    inference()  # the orchestrator restarts it on the same socket
    wait_for(lambda: r.xlen(keys.VERDICT_STREAM) >= n, timeout=180, what="every verdict")
    time.sleep(1.0)
    got = verdicts(r)
    assert len(got) == n and len({v["source"]["key"] for v in got}) == n
    assert all(v["status"] == "ok" for v in got), [v["error"] for v in got if v["status"] != "ok"][:3]
    # The requests in flight at the kill were sent again, not failed.
    assert "reconnected to the inference process; resending" in ingest.tail(10**6)
    assert "resending 0 requests" not in ingest.tail(10**6)


def test_an_ingest_process_without_its_inference_process_exits_before_consuming(
    ingest_env, r, send, bucket, tmp_path
):
    send(bucket, ["k/never.jpg"])
    env = {**ingest_env, "MODGATE_INFERENCE__CONNECT_TIMEOUT_S": "1", "MODGATE_WORKER__METRICS_PORT": "0"}
    import os

    proc = subprocess.run(
        [sys.executable, "-m", "worker.cli", "worker", "--queues", "modgate"],
        env={**os.environ, **env},
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 3
    assert b"no inference process answered" in proc.stdout + proc.stderr
    assert r.llen("modgate") == 1  # the message is still queued for a worker that can serve it


def test_sigterm_keeps_the_inference_process_serving_until_its_ingest_processes_leave(
    inference, ingest_env, workers, r, send, s3_client, bucket
):
    s3_client.put_object(Bucket=bucket, Key="k/after.jpg", Body=jpeg(7))
    server = inference()
    ingest = workers(ingest_env, name="ingest", queues="modgate")
    server.proc.send_signal(signal.SIGTERM)  # a pod stopping: every container gets it at once
    time.sleep(2.0)
    assert server.proc.poll() is None  # still serving its draining client
    send(bucket, ["k/after.jpg"])
    wait_for(lambda: r.xlen(keys.VERDICT_STREAM) >= 1, what="the verdict of a message sent after SIGTERM")
    assert verdicts(r)[0]["status"] == "ok"
    assert ingest.terminate() == 0
    assert server.proc.wait(30) == 0  # gone once its last client left


def test_a_pdq_bank_matches_in_the_split_shape(inference, ingest_env, workers, r, send, s3_client, bucket):
    """The frame is decoded (and hashed) by the inference process; the hash comes back with
    the scores and the ingest process matches it against a PDQ bank in Redis: a re-encoded
    copy (other bytes, so no exact match) of a banked image is flagged by its PDQ."""
    import os
    import subprocess

    from threatexchange.signal_type.pdq.pdq_hasher import pdq_from_bytes

    from worker.ingest.hashing import pdq_distance

    original = jpeg(70, 2400, 1800)  # a memfd request, hashed on the device path
    copy = io.BytesIO()
    Image.open(io.BytesIO(original)).save(copy, "JPEG", quality=70)
    banked, _ = pdq_from_bytes(original)
    s3_client.put_object(Bucket=bucket, Key="copy.jpg", Body=copy.getvalue())
    s3_client.put_object(Bucket=bucket, Key="other.jpg", Body=jpeg(71, 640, 480))
    cli = {**os.environ, **ingest_env}
    for args in (["add", "takedowns", "--kind", "pdq", "--action", "unsafe"], ["add", "takedowns", banked]):
        done = subprocess.run(
            [sys.executable, "-m", "worker.cli", "banks", *args], env=cli, capture_output=True
        )
        assert done.returncode == 0, done.stderr
    inference()
    workers(ingest_env, name="ingest", queues="modgate")
    send(bucket, ["copy.jpg", "other.jpg"])
    wait_for(lambda: r.xlen(keys.VERDICT_STREAM) >= 2, what="verdicts")
    got = {v["source"]["key"]: v for v in verdicts(r)}
    hit, miss = got["copy.jpg"], got["other.jpg"]
    assert hit["hashes"]["pdq"] == pdq_from_bytes(copy.getvalue())[0]
    assert hit["decision"] == "unsafe" and [m["bank"] for m in hit["matches"]] == ["takedowns"]
    assert copy.getvalue() != original  # matched by its PDQ, not by its bytes
    assert hit["matches"][0]["distance"] == pdq_distance(banked, hit["hashes"]["pdq"]) <= 31
    assert miss["matches"] == [] and miss["hashes"]["pdq"] == pdq_from_bytes(jpeg(71, 640, 480))[0]
