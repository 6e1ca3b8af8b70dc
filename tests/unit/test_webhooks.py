"""Webhook signing, the SSRF guard and the delivery state machine (real Redis, real HTTP)."""

import hashlib
import hmac
import socket
import time

import pytest
import redis

from tests.servers import WebhookReceiver
from worker import keys
from worker.settings import WebhookSettings
from worker.webhooks import (
    MAX_HOP_S,
    Delivery,
    Dispatcher,
    WebhookRefused,
    _retry_after,
    resolve_target,
    sign,
    verify,
)

SECRET = b"s3cr3t"


def fake_resolver(*ips):
    def resolve(host, port, type=0):
        return [(socket.AF_INET6 if ":" in ip else socket.AF_INET, type, 6, "", (ip, port)) for ip in ips]

    return resolve


def test_signature_is_hmac_sha256_over_timestamp_dot_body():
    body = b'{"id": "x"}'
    header = sign(SECRET, body, 1_700_000_000)
    t, v1 = (part.split("=", 1)[1] for part in header.split(","))
    assert t == "1700000000"
    assert v1 == hmac.new(SECRET, b"1700000000." + body, hashlib.sha256).hexdigest()
    assert verify(SECRET, body, header, now=1_700_000_100)
    assert not verify(SECRET, body + b" ", header, now=1_700_000_100)
    assert not verify(b"other", body, header, now=1_700_000_100)
    assert not verify(SECRET, body, header, now=1_700_001_000)  # replayed too late
    assert not verify(SECRET, body, "garbage")


@pytest.mark.parametrize(
    "ip",
    [
        "127.0.0.1",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "::1",
        "fe80::1",
        "fd00::1",
        "::ffff:127.0.0.1",
        "ff02::1",
    ],
)
def test_private_loopback_link_local_and_multicast_are_refused(ip):
    with pytest.raises(WebhookRefused, match="allow_hosts"):
        resolve_target("https://hooks.example.com/x", WebhookSettings(), fake_resolver(ip))


def test_public_addresses_pass_and_the_checked_ip_is_the_one_used():
    host, port, ip = resolve_target(
        "https://hooks.example.com:8443/x", WebhookSettings(), fake_resolver("93.184.215.14")
    )
    assert (host, port, ip) == ("hooks.example.com", 8443, "93.184.215.14")


def test_one_private_answer_among_public_ones_is_enough_to_refuse():
    with pytest.raises(WebhookRefused):
        resolve_target("http://a.example.com/", WebhookSettings(), fake_resolver("93.184.215.14", "10.1.2.3"))


def test_explicit_allow_by_host_ip_or_network():
    resolve_target(
        "http://127.0.0.1:9/x", WebhookSettings(allow_hosts=["127.0.0.1"]), fake_resolver("127.0.0.1")
    )
    resolve_target(
        "http://svc.internal/", WebhookSettings(allow_hosts=["svc.internal"]), fake_resolver("10.0.0.7")
    )
    resolve_target(
        "http://svc.internal/", WebhookSettings(allow_hosts=["10.0.0.0/8"]), fake_resolver("10.0.0.7")
    )
    with pytest.raises(WebhookRefused):
        resolve_target(
            "http://svc.internal/",
            WebhookSettings(allow_hosts=["10.0.0.0/8"]),
            fake_resolver("169.254.169.254"),
        )


def test_host_allowlist_and_scheme():
    settings = WebhookSettings(hosts=["*.example.com"])
    resolve_target("https://a.example.com/", settings, fake_resolver("93.184.215.14"))
    with pytest.raises(WebhookRefused, match=r"webhook\.hosts"):
        resolve_target("https://evil.test/", settings, fake_resolver("93.184.215.14"))
    with pytest.raises(WebhookRefused, match="http"):
        resolve_target("file:///etc/passwd", WebhookSettings(), fake_resolver("93.184.215.14"))
    with pytest.raises(WebhookRefused, match="http"):
        resolve_target("gopher://a.example.com/", WebhookSettings(), fake_resolver("93.184.215.14"))


def test_retry_after_seconds_and_http_date():
    assert _retry_after("7") == 7.0
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 60))
    assert 55 <= _retry_after(future) <= 61
    assert _retry_after("soon") is None and _retry_after(None) is None


@pytest.fixture
def r(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    return client


class Scheduled(list):
    def __call__(self, delivery, countdown):
        self.append((delivery, countdown))


def make(r, hook_url=None, **settings):
    scheduled = Scheduled()
    base = {"allow_hosts": ["127.0.0.1"], "secret": "s3cr3t", "backoff_base_s": 1.0, "max_attempts": 3}
    dispatcher = Dispatcher(r, WebhookSettings(**{**base, **settings}), scheduled)
    return dispatcher, scheduled


def test_delivered_once_even_when_copies_arrive(r):
    hook = WebhookReceiver()
    dispatcher, scheduled = make(r)
    d = Delivery.new("verdict-1", hook.url, '{"id": "verdict-1"}', tenant=None)
    assert dispatcher.deliver(d) == "delivered"
    assert dispatcher.deliver(d) == "duplicate"
    assert len(hook.requests) == 1 and not scheduled
    req = hook.requests[0]
    assert req["headers"]["Modgate-Event-Id"] == "verdict-1"
    assert verify(SECRET, req["body"], req["headers"]["Modgate-Signature"])
    hook.stop()


def test_a_copy_finding_the_lease_held_does_not_post_but_looks_again_later(r):
    hook = WebhookReceiver()
    dispatcher, scheduled = make(r)
    d = Delivery.new("verdict-2", hook.url, "{}", tenant=None)
    r.set(keys.delivery_lease(d.delivery_id), "a-process-that-died", px=1500)
    assert dispatcher.deliver(d) == "busy"
    assert hook.requests == []
    ((again, countdown),) = scheduled  # not dropped: the holder may be dead
    assert again == d and 1.0 <= countdown <= 2.6
    time.sleep(1.6)  # the dead holder's lease runs out
    assert dispatcher.deliver(again) == "delivered" and len(hook.requests) == 1
    hook.stop()


def test_retry_is_scheduled_once_per_attempt_and_honours_retry_after(r):
    hook = WebhookReceiver(default=503)
    dispatcher, scheduled = make(r)
    d = Delivery.new("verdict-3", hook.url, "{}", tenant=None)
    assert dispatcher.deliver(d) == "retry"
    assert dispatcher.deliver(d) == "retry"  # a duplicate copy of attempt 1 fails too...
    assert len(scheduled) == 1  # ...but cannot fork the retry chain
    following, countdown = scheduled[0]
    assert following.attempt == 2 and following.last_error == "HTTP 503 Service Unavailable"
    assert 0.5 <= countdown <= 1.0
    hook.stop()


def test_per_tenant_secret(r):
    hook = WebhookReceiver()
    dispatcher, _ = make(r, secrets={"acme": "acme-secret"})
    dispatcher.deliver(Delivery.new("v-acme", hook.url, "{}", tenant="acme"))
    dispatcher.deliver(Delivery.new("v-other", hook.url, "{}", tenant="other"))
    acme, other = hook.requests
    assert verify(b"acme-secret", acme["body"], acme["headers"]["Modgate-Signature"])
    assert verify(SECRET, other["body"], other["headers"]["Modgate-Signature"])
    hook.stop()


def test_client_errors_are_not_retried(r):
    hook = WebhookReceiver(default=404)
    dispatcher, scheduled = make(r)
    assert dispatcher.deliver(Delivery.new("v4", hook.url, "{}", tenant=None)) == "dead"
    assert not scheduled and r.xlen(keys.WEBHOOK_DEAD_STREAM) == 1
    hook.stop()


def test_long_waits_are_split_into_hops_below_the_visibility_timeout(r):
    dispatcher, scheduled = make(r)
    d = Delivery.new("v5", "http://127.0.0.1:9/x", "{}", tenant=None).model_copy(
        update={"not_before": time.time() + 3 * MAX_HOP_S}
    )
    assert dispatcher.deliver(d) == "waiting"
    assert dispatcher.deliver(d) == "waiting"
    ((hop, countdown),) = scheduled
    assert hop.hop == 1 and countdown == MAX_HOP_S
