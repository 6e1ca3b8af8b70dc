"""Backlog soak: 5,000 keys queued far faster than one worker drains them (open_nsfw only,
small JPEGs). The worker's resident memory must stay within ±15 % of its level after
warm-up (sampled from /proc while it drains), and no key may time out."""

from __future__ import annotations

import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from modgate import keys
from modgate.contract import Item
from modgate.settings import ProducerRoute, load_settings
from producers.enqueuer import Enqueuer
from tests.faults.conftest import MESSAGE_TIMEOUT_S, rss_bytes
from tests.helpers import jpeg

N_KEYS = 5000
WARM_UP_KEYS = 500  # the first 10 %: models warm, pools and batches at their working size
TOLERANCE = 0.15
MiB = 1024 * 1024
STALL_S = 4 * MESSAGE_TIMEOUT_S  # no new verdict for this long: the worker is stuck


def test_backlog_keeps_worker_memory_flat_and_times_nothing_out(
    env, r, workers, moto_server, s3_client, bucket
):
    bodies = [jpeg(i, 160, 120) for i in range(50)]
    names = [f"soak/{i:05d}.jpg" for i in range(N_KEYS)]
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(
                lambda i: s3_client.put_object(Bucket=bucket, Key=names[i], Body=bodies[i % 50]),
                range(N_KEYS),
            )
        )
    # Straight to moto: the proxy's own CPU would only slow this 2-core box down.
    worker = workers({**env, "MODGATE_S3__ENDPOINT_URL": moto_server.url}, queues="modgate")
    idle_rss = rss_bytes(worker.proc.pid)
    # The whole backlog at once, the way a backfill sends it: 64 keys a message.
    enqueuer = Enqueuer(load_settings(redis={"url": env["MODGATE_REDIS__URL"]}))
    enqueuer.send([Item(bucket=bucket, key=k) for k in names], ProducerRoute(bucket=bucket))

    samples: list[tuple[int, int]] = []  # (verdicts so far, RSS)
    started = last_progress = time.monotonic()
    while time.monotonic() < started + 420:
        done = r.xlen(keys.VERDICT_STREAM)
        if samples and done > samples[-1][0]:
            last_progress = time.monotonic()
        samples.append((done, rss_bytes(worker.proc.pid)))
        if done >= N_KEYS and r.zcard(keys.OUTBOX) == 0:
            break
        assert worker.proc.poll() is None, f"the worker died: {worker.tail(2000)}"
        if time.monotonic() - last_progress > STALL_S:
            break  # reported below with the figures
        time.sleep(0.5)
    elapsed = time.monotonic() - started

    after = [rss for done, rss in samples if done >= WARM_UP_KEYS]
    figures = (
        f"idle {idle_rss / MiB:.0f} MiB; after warm-up ({len(after)} samples over {elapsed:.0f} s): "
        f"min {min(after, default=0) / MiB:.0f}, median {statistics.median(after or [0]) / MiB:.0f}, "
        f"max {max(after, default=0) / MiB:.0f} MiB; {samples[-1][0]}/{N_KEYS} verdicts"
    )
    print(f"\nbacklog soak RSS: {figures}")
    stalled = f" (no new verdict for {STALL_S} s)" if time.monotonic() - last_progress > STALL_S else ""
    assert samples[-1][0] >= N_KEYS, f"the backlog did not drain{stalled}: {figures}"

    verdicts = [json.loads(fields[b"verdict"]) for _, fields in r.xrange(keys.VERDICT_STREAM)]
    by_key: dict[str, list[dict]] = {}
    for v in verdicts:
        by_key.setdefault(v["source"]["key"], []).append(v)
    assert set(by_key) == set(names)
    problems = []
    not_ok = {
        k: [(v.get("error") or {}).get("code") for v in vs]
        for k, vs in by_key.items()
        if any(v["status"] != "ok" for v in vs)
    }
    if not_ok:
        problems.append(f"{len(not_ok)} keys got error verdicts, e.g. {dict(list(not_ok.items())[:3])}")
    repeated = {k: len(vs) for k, vs in by_key.items() if len(vs) != 1}
    if repeated:
        problems.append(f"{len(repeated)} keys have more than one verdict")
    reference = statistics.median(after[:5])
    low, high = (1 - TOLERANCE) * reference, (1 + TOLERANCE) * reference
    outside = [rss for rss in after if not low <= rss <= high]
    if outside:
        problems.append(f"RSS left ±{TOLERANCE:.0%} of {reference / MiB:.0f} MiB in {len(outside)} samples")
    assert problems == [], f"{'; '.join(problems)} ({figures})"
