"""One tenant's webhook endpoint answers one byte a second and never finishes (a tar pit);
other tenants' deliveries must go on, each delivered once."""

from __future__ import annotations

import json
from collections import Counter

from modgate.contract import Item
from modgate.settings import ProducerRoute, load_settings
from producers.enqueuer import Enqueuer
from tests.faults.proxy import Fault, FaultProxy
from tests.helpers import upload, wait_for
from tests.servers import WebhookReceiver

SLOW_KEYS = 16
OTHER_KEYS = 12  # per other tenant
DISPATCHER_THREADS = 4  # fewer than the slow deliveries: a dispatcher that blocks is stuck


def test_a_slow_drip_endpoint_does_not_stall_other_tenants(env, r, workers, s3_client, bucket):
    keys_ = upload(s3_client, bucket, SLOW_KEYS + 2 * OTHER_KEYS, prefix="drip")
    slow_keys, a_keys, b_keys = keys_[:SLOW_KEYS], keys_[SLOW_KEYS:-OTHER_KEYS], keys_[-OTHER_KEYS:]
    tarpit_backend = WebhookReceiver()
    # A different host (127.0.0.2) from the other tenants' endpoints, as a tenant's own
    # server would be: per-host limits must not make the others pay for it.
    tarpit = FaultProxy(tarpit_backend.url.rsplit("/", 1)[0], host="127.0.0.2")
    tarpit.rule = lambda method, path: Fault(drip_s=1.0, endless=True)
    hook_a, hook_b = WebhookReceiver(), WebhookReceiver()
    try:
        workers(env, name="moderation", queues="modgate")
        dispatcher = workers(
            {**env, "MODGATE_WORKER__CONCURRENCY": str(DISPATCHER_THREADS)},
            name="dispatcher",
            queues="modgate.webhooks",
        )
        enqueuer = Enqueuer(load_settings(redis={"url": env["MODGATE_REDIS__URL"]}))
        routes = {
            "slow": ProducerRoute(bucket=bucket, tenant="slow", callback_url=f"{tarpit.url}/hook"),
            "a": ProducerRoute(bucket=bucket, tenant="a", callback_url=hook_a.url),
            "b": ProducerRoute(bucket=bucket, tenant="b", callback_url=hook_b.url),
        }
        # The tar pit's verdicts first: their deliveries reach the dispatcher first.
        for tenant, tenant_keys in (("slow", slow_keys), ("a", a_keys), ("b", b_keys)):
            for k in tenant_keys:
                enqueuer.send([Item(bucket=bucket, key=k)], routes[tenant])

        wait_for(lambda: tarpit.seen(), what="the first delivery to the tar pit")
        try:
            wait_for(
                lambda: len(hook_a.delivered()) >= OTHER_KEYS and len(hook_b.delivered()) >= OTHER_KEYS,
                timeout=90,
                what="the other tenants' deliveries while the tar pit drips",
            )
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}: tenant a got {len(hook_a.delivered())}/{OTHER_KEYS}, b {len(hook_b.delivered())}"
                f"/{OTHER_KEYS}; the tar pit holds {len(tarpit.seen())} requests"
                f"\ndispatcher log:\n{dispatcher.tail(2000)}"
            ) from None
        print(f"\nwebhook drip: the tar pit holds {len(tarpit.seen())} requests; others all delivered")
        for hook, tenant_keys in ((hook_a, a_keys), (hook_b, b_keys)):
            got = Counter(json.loads(d["body"])["source"]["key"] for d in hook.delivered())
            assert got == Counter(tenant_keys), "each of a tenant's verdicts exactly once"
    finally:
        tarpit.stop()
        for hook in (tarpit_backend, hook_a, hook_b):
            hook.stop()
