"""S3 answers 503 SlowDown for a while, then recovers: no key may be lost (each ends with an
ok verdict) and the worker must not storm S3 (GETs ≤ keys × the configured max attempts,
counted at the proxy in front of moto)."""

from __future__ import annotations

import json
from collections import defaultdict

from modgate import keys
from modgate.contract import Item
from modgate.settings import ProducerRoute, load_settings
from producers.enqueuer import Enqueuer
from tests.faults.proxy import S3_SLOW_DOWN, Fault
from tests.helpers import upload, wait_for

N_KEYS = 60
MAX_ATTEMPTS = 5
OUTAGE_S = 2.5


def test_s3_503_burst_loses_no_key_and_causes_no_retry_storm(env, r, s3_proxy, workers, s3_client, bucket):
    keys_ = upload(s3_client, bucket, N_KEYS, prefix="outage")  # straight to moto, not counted
    env = {**env, "MODGATE_S3__MAX_ATTEMPTS": str(MAX_ATTEMPTS)}
    worker = workers(env, queues="modgate")

    def object_get(method: str, path: str) -> bool:
        return method == "GET" and path.startswith(f"/{bucket}/")

    # The outage starts with the worker's first GET, so every key meets it.
    s3_proxy.outage(OUTAGE_S, Fault(status=503, body=S3_SLOW_DOWN), match=object_get)
    enqueuer = Enqueuer(load_settings(redis={"url": env["MODGATE_REDIS__URL"]}))
    enqueuer.send([Item(bucket=bucket, key=k) for k in keys_[: N_KEYS // 2]], ProducerRoute(bucket=bucket))
    for k in keys_[N_KEYS // 2 :]:  # one-key messages too: each its own retry schedule
        enqueuer.send([Item(bucket=bucket, key=k)], ProducerRoute(bucket=bucket))

    def latest() -> dict[str, dict]:
        out: dict[str, dict] = {}
        for _, fields in r.xrange(keys.VERDICT_STREAM):
            verdict = json.loads(fields[b"verdict"])
            out[verdict["source"]["key"]] = verdict
        return out

    # Done when every key has a verdict and every message was finished (a message put back
    # to try again later keeps its outbox entry until it is done).
    wait_for(
        lambda: set(latest()) >= set(keys_) and r.zcard(keys.OUTBOX) == 0,
        timeout=180,
        what="a verdict for every key after the outage",
    )
    gets = s3_proxy.seen(lambda s: object_get(s.method, s.path))
    refused = [s for s in gets if s.status == 503]
    assert refused, "the outage never happened: no GET was answered 503"
    print(f"\nS3 outage: {len(gets)} GETs for {N_KEYS} keys, {len(refused)} answered 503")

    final = latest()
    lost = {k: (final[k].get("error") or {}).get("code") for k in keys_ if final[k]["status"] != "ok"}
    assert lost == {}, f"keys without an ok verdict after S3 recovered ({len(lost)}/{N_KEYS})"
    per_key: dict[str, int] = defaultdict(int)
    for s in gets:
        per_key[s.path] += 1
    assert len(gets) <= N_KEYS * MAX_ATTEMPTS, (
        f"retry storm: {len(gets)} GETs for {N_KEYS} keys (max {MAX_ATTEMPTS} each), "
        f"{len(refused)} answered 503, most for one key {max(per_key.values())}"
    )
    assert worker.proc.poll() is None
