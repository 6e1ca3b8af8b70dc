"""The split shape of a GPU node: the inference process comes back, mid-backlog, with a
detector missing (its weights gone, a bad rollout). The ingest process that started with
both must not attach to it: no `ok` verdict may rest on a detector that is not there. It
holds its requests and stops being live; once restarted (what the orchestrator's liveness
probe does) its messages are redelivered, and every key ends in exactly one verdict that
names the detectors that actually scored it."""

from __future__ import annotations

import shutil
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from celery import Celery

from modgate import keys
from tests.helpers import jpeg, verdicts, wait_for
from tests.servers import InferenceProcess

N_KEYS = 120
PER_MESSAGE = 4
BOTH = '["open_nsfw", "nudenet"]'
FEWER = '["open_nsfw"]'


@pytest.fixture
def socket_dir():
    path = Path(tempfile.mkdtemp(prefix="mg-"))  # a socket path stays under ~100 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _live(base: str) -> bool:
    try:
        return urllib.request.urlopen(base + "/livez", timeout=2).status == 200
    except urllib.error.HTTPError:
        return False


def test_an_inference_process_back_with_fewer_detectors_gives_no_verdict_without_them(
    env, r, workers, s3_client, bucket, socket_dir, tmp_path
):
    keys_ = [f"split/{i:03d}.jpg" for i in range(N_KEYS)]
    for i, key in enumerate(keys_):
        s3_client.put_object(Bucket=bucket, Key=key, Body=jpeg(i, 640, 480))
    sock = socket_dir / "inference.sock"
    inference_env = {**env, "MODGATE_DECODE__BACKEND": "tensor"}
    started = []

    def inference(detectors: str) -> InferenceProcess:
        p = InferenceProcess(
            {**inference_env, "MODGATE_DETECTORS__ENABLED": detectors},
            sock,
            tmp_path / f"inference-{len(started)}.log",
        )
        started.append(p)
        return p

    ingest_env = {
        **env,
        "MODGATE_INFERENCE__SOCKET": str(sock),
        # The orchestrator's restart: a short drain, then the held messages go back.
        "MODGATE_WORKER__DRAIN_TIMEOUT_S": "3",
    }
    app = Celery(broker=env["MODGATE_REDIS__URL"], set_as_current=False)
    app.conf.task_serializer = "json"
    try:
        first = inference(BOTH)
        ingest = workers(ingest_env, name="ingest-a", queues="modgate")
        for i in range(0, N_KEYS, PER_MESSAGE):
            items = [{"bucket": bucket, "key": k} for k in keys_[i : i + PER_MESSAGE]]
            app.send_task("modgate.moderate", args=[{"items": items}], queue="modgate")
        wait_for(lambda: r.xlen(keys.VERDICT_STREAM) >= 4, what="the first verdicts")
        first.kill()  # kill -9 mid-backlog
        assert r.xlen(keys.VERDICT_STREAM) < N_KEYS, "the backlog finished before the restart"
        inference(FEWER)  # back on the same socket, without nudenet
        wait_for(lambda: not _live(ingest.base), timeout=60, what="the ingest process to report not live")
        before_restart = r.xlen(keys.VERDICT_STREAM)
        time.sleep(2.0)  # while not live it publishes nothing (it has no scores for nudenet)
        assert r.xlen(keys.VERDICT_STREAM) == before_restart
        assert "not attaching" in ingest.tail(10**6)
        ingest.terminate(timeout=60)  # liveness failed: the orchestrator restarts it
        fresh = workers(ingest_env, name="ingest-b", queues="modgate")  # learns the new detectors
        wait_for(
            lambda: {v["source"]["key"] for v in verdicts(r)} >= set(keys_),
            timeout=240,
            what="a verdict for every key",
        )
        time.sleep(1.0)  # a duplicate would show up now
        got = verdicts(r)
        assert sorted(v["source"]["key"] for v in got) == keys_  # exactly one each
        assert all(v["status"] == "ok" for v in got), [v.get("error") for v in got if v["status"] != "ok"][:3]
        for n, v in enumerate(got):
            # Before the ingest process restarted: both detectors scored it; after, the one
            # the inference process serves. Never a verdict naming a detector that gave no
            # score, never one that silently lost one.
            expected = {"open_nsfw", "nudenet"} if n < before_restart else {"open_nsfw"}
            assert set(v["detectors"]) == expected, (n, v["source"]["key"], sorted(v["detectors"]))
            assert all(d["scores"] for d in v["detectors"].values())
        assert _live(fresh.base)
    finally:
        app.close()
        for p in started:
            p.stop()
