"""Webhook signing, the SSRF guard and the delivery state machine (real Redis, real HTTP)."""

import base64
import hashlib
import hmac
import json
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
import standardwebhooks
import stripe
from kombu.exceptions import OperationalError

from modgate import keys
from modgate.settings import WebhookSettings, load_settings
from modgate.signing import sign_standard, standard_secret, verify_headers
from tests.faults.proxy import Fault, FaultProxy
from tests.servers import WebhookReceiver
from worker.delivery.webhooks import (
    MAX_HOP_S,
    Delivery,
    Dispatcher,
    WebhookRefused,
    _retry_after,
    event_id,
    resolve_target,
    sign,
    unsigned_warning,
    verify,
)

SECRET = b"s3cr3t-s3cr3t-s3cr3t"
S = "a-secret-of-16-bytes"


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
    assert not verify(b"other-secret-0123456", body, header, now=1_700_000_100)
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


def make(r, hook_url=None, resolver=socket.getaddrinfo, **settings):
    scheduled = Scheduled()
    base = {
        "allow_hosts": ["127.0.0.1"],
        "secret": "s3cr3t-s3cr3t-s3cr3t",
        "backoff_base_s": 1.0,
        "max_attempts": 3,
    }
    dispatcher = Dispatcher(r, WebhookSettings(**{**base, **settings}), scheduled, resolver=resolver)
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
    dispatcher, _ = make(r, secrets={"acme": "acme-secret-0123456"})
    dispatcher.deliver(Delivery.new("v-acme", hook.url, "{}", tenant="acme"))
    dispatcher.deliver(Delivery.new("v-other", hook.url, "{}", tenant="other"))
    acme, other = hook.requests
    assert verify(b"acme-secret-0123456", acme["body"], acme["headers"]["Modgate-Signature"])
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


# -- the envelope: event identity, headers, signatures receivers' libraries verify --------


def test_envelope_headers_name_the_stream_entry_the_verdict_and_the_event_type(r):
    hook = WebhookReceiver()
    dispatcher, _ = make(r)
    d = Delivery.new("vid-1:1700000000000-0", hook.url, '{"id": "vid-1"}', tenant=None, verdict_id="vid-1")
    assert dispatcher.deliver(d) == "delivered"
    headers = hook.requests[0]["headers"]
    assert headers["Modgate-Event-Id"] == headers["webhook-id"] == "vid-1:1700000000000-0"
    assert headers["Modgate-Verdict-Id"] == "vid-1"
    assert headers["Modgate-Event-Type"] == "verdict.created"
    assert headers["Modgate-Signature"].startswith(f"t={headers['webhook-timestamp']},v1=")
    hook.stop()


def test_event_ids_of_two_stream_entries_of_one_verdict_are_two_deliveries(r):
    hook = WebhookReceiver()
    dispatcher, _ = make(r)
    first = Delivery.new(event_id("vid-2", "1-0"), hook.url, '{"status": "error"}', None, verdict_id="vid-2")
    later = Delivery.new(event_id("vid-2", "9-0"), hook.url, '{"status": "ok"}', None, verdict_id="vid-2")
    assert first.delivery_id != later.delivery_id
    assert dispatcher.deliver(first) == "delivered" and dispatcher.deliver(later) == "delivered"
    assert [req["body"] for req in hook.requests] == [b'{"status": "error"}', b'{"status": "ok"}']


PLAIN = "plain-secret-4711"
WHSEC = "whsec_" + base64.b64encode(b"\x00\x01random key bytes\xff").decode()


@pytest.mark.parametrize("configured", [PLAIN, WHSEC])
def test_standard_webhooks_and_stripe_libraries_verify_a_delivery(r, configured):
    hook = WebhookReceiver()
    dispatcher, _ = make(r, secret=configured)
    dispatcher.deliver(Delivery.new("vid-3:5-0", hook.url, '{"id": "vid-3", "x": "é"}', None))
    (req,) = hook.requests
    # Standard Webhooks: a whsec_ secret as is, a plain one as documented (whsec_ + base64 of it).
    receiver_secret = configured if configured.startswith("whsec_") else standard_secret(configured)
    assert standardwebhooks.Webhook(receiver_secret).verify(req["body"], req["headers"]) == json.loads(
        req["body"]
    )
    # Stripe: the configured string.
    assert stripe.WebhookSignature.verify_header(
        req["body"], req["headers"]["Modgate-Signature"], configured, tolerance=300
    )
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(standard_secret("another-secret-01234")).verify(req["body"], req["headers"])
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.WebhookSignature.verify_header(
            req["body"], req["headers"]["Modgate-Signature"], "another-secret-01234"
        )
    assert verify_headers(configured, req["body"], req["headers"])
    hook.stop()


def test_during_a_rotation_every_active_secret_signs_and_any_one_verifies(r):
    hook = WebhookReceiver()
    dispatcher, _ = make(
        r,
        secret="new-secret-0123456789",
        rotation_secrets=["old-secret-0123456789"],
        secrets={"acme": ["acme-new-0123456789", "acme-old-0123456789"]},
    )
    dispatcher.deliver(Delivery.new("v-r:1-0", hook.url, "{}", tenant=None))
    dispatcher.deliver(Delivery.new("v-r:2-0", hook.url, "{}", tenant="acme"))
    default, acme = hook.requests
    for req, accepted in (
        (default, ["new-secret-0123456789", "old-secret-0123456789"]),
        (acme, ["acme-new-0123456789", "acme-old-0123456789"]),
    ):
        assert req["headers"]["Modgate-Signature"].count("v1=") == 2
        assert len(req["headers"]["webhook-signature"].split()) == 2
        for secret in accepted:
            assert verify(secret.encode(), req["body"], req["headers"]["Modgate-Signature"])
            assert verify_headers(secret, req["body"], req["headers"])
            stripe.WebhookSignature.verify_header(req["body"], req["headers"]["Modgate-Signature"], secret)
            standardwebhooks.Webhook(standard_secret(secret)).verify(req["body"], req["headers"])
        assert not verify_headers("someone-else-0123456789", req["body"], req["headers"])
    hook.stop()


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "t=abc,v1=00",
        "v1=00",
        "t=1700000000",
        "t=1700000000,t=1700000001,v1=00",
        "t=1700000000,v1=é",
        ",,,",
    ],
)
def test_verify_returns_false_on_missing_or_malformed_headers(header):
    assert verify(SECRET, b"{}", header, now=1_700_000_000) is False


def test_verify_headers_is_false_without_signatures_and_checks_the_event_id():
    body = b"{}"
    assert not verify_headers(S, body, {})
    assert not verify_headers(S, body, {"webhook-signature": "v1,AAAA"})  # no id, no timestamp
    now = int(time.time())
    headers = {
        "webhook-id": "v:1-0",
        "webhook-timestamp": str(now),
        "webhook-signature": sign_standard([S], "v:1-0", body, now),
    }
    assert verify_headers(S, body, headers)
    assert not verify_headers(S, body, {**headers, "webhook-id": "v:2-0"})  # another event's id


def test_whsec_secrets_must_be_base64():
    with pytest.raises(ValueError, match="base64"):
        WebhookSettings(secret="whsec_not base64!")


SHORT = ["", "s", "x" * 15, "whsec_", "whsec_" + base64.b64encode(b"k" * 15).decode(), "é" * 7]


@pytest.mark.parametrize("short", SHORT)
def test_empty_or_short_secrets_are_refused_at_start_up(short):
    for settings in ({"secret": short}, {"rotation_secrets": [S, short]}, {"secrets": {"acme": [S, short]}}):
        with pytest.raises(ValueError, match="at least 16"):
            WebhookSettings(**settings)
    if len(short.encode()) < 16:  # the receiver keys by the string as given, whsec_ or not
        with pytest.raises(ValueError, match="at least 16"):
            load_settings(receiver={"hmac_secret": short})
    assert WebhookSettings(secret="x" * 16).secret is not None
    assert WebhookSettings(secret="whsec_" + base64.b64encode(b"k" * 16).decode()).secret is not None


def test_the_settings_error_names_the_field_but_never_the_secret():
    with pytest.raises(ValueError) as refused:
        load_settings(receiver={"hmac_secret": "hunter2-hunter2"}, webhook={"secret": "whsec_not base64!"})
    assert "receiver.hmac_secret" in str(refused.value) and "webhook.secret" in str(refused.value)
    assert "hunter2" not in str(refused.value) and "not base64!" not in str(refused.value)


def test_an_empty_receiver_token_is_refused():
    with pytest.raises(ValueError, match=r"receiver\.token"):
        load_settings(receiver={"token": ""})


@pytest.mark.parametrize("short", [b"", b"k" * 15, "", "k" * 15])
def test_the_helper_refuses_to_sign_or_verify_with_a_short_key(short):
    body, now = b"{}", 1_700_000_000
    # With an empty key anyone computes the "right" MAC: the helper must not accept it.
    forged = sign(b"k" * 16, body, now).replace(
        sign(b"k" * 16, body, now).split("v1=")[1],
        hmac.new(b"", b"1700000000.{}", hashlib.sha256).hexdigest(),
    )
    headers = {"webhook-id": "e", "webhook-timestamp": str(now), "webhook-signature": "v1,AAAA"}
    for call in (
        lambda: verify(short, body, forged, now=now),
        lambda: verify([S, short], body, forged, now=now),
        lambda: verify_headers(short, body, {"Modgate-Signature": forged}, now=now),
        lambda: verify_headers(short, body, headers, now=now),
        lambda: sign(short, body, now),
        lambda: sign_standard(short, "e", body, now),
    ):
        with pytest.raises(ValueError, match="at least 16"):
            call()


def test_userinfo_is_stripped_before_the_delivery_is_stored_sent_or_logged(r, caplog):
    hook = WebhookReceiver(default=404)
    dispatcher, _ = make(r)
    url = hook.url.replace("http://", "http://user:hunter2@")
    d = Delivery.new("v-u:1-0", url, "{}", tenant=None)
    assert d.url == hook.url and "hunter2" not in d.model_dump_json()
    assert Delivery.model_validate({**d.model_dump(), "url": url}).url == hook.url  # queued before
    assert dispatcher.deliver(d) == "dead"
    assert "Authorization" not in hook.requests[0]["headers"]
    assert b"hunter2" not in b"".join(v for _, f in r.xrange(keys.WEBHOOK_DEAD_STREAM) for v in f.values())
    assert "hunter2" not in caplog.text
    hook.stop()


def test_unsigned_deliveries_are_warned_about():
    assert "unsigned" in unsigned_warning(WebhookSettings())
    assert "acme" in unsigned_warning(WebhookSettings(secrets={"acme": "x" * 16}))
    assert unsigned_warning(WebhookSettings(secret=S)) is None


# -- SSRF: IPv6 forms that embed an IPv4 address --------------------------------------------


@pytest.mark.parametrize(
    ("ip", "embedded"),
    [
        ("64:ff9b::a00:1", "10.0.0.1"),  # NAT64 well-known prefix
        ("64:ff9b::a9fe:a9fe", "169.254.169.254"),
        ("64:ff9b:1:a00:0:100::", "10.0.0.1"),  # NAT64 local-use, /48 layout
        ("64:ff9b:1::7f00:1", "127.0.0.1"),  # NAT64 local-use, /96 layout
        ("2002:a00:1::1", "10.0.0.1"),  # 6to4
        ("2002:a9fe:a9fe::1", "169.254.169.254"),
        ("::a00:1", "10.0.0.1"),  # IPv4-compatible
        ("::7f00:1", "127.0.0.1"),
        ("2001:0:a00:1::1", "10.0.0.1"),  # Teredo server
        ("2001:0:5db8:d70e:0:f5ff:f5ff:fffe", "10.0.0.1"),  # Teredo client (obfuscated)
    ],
)
def test_ipv6_forms_embedding_a_private_ipv4_are_refused(ip, embedded):
    with pytest.raises(WebhookRefused, match=rf"embeds [^)]*{re.escape(embedded)}"):
        resolve_target("https://hooks.example.com/x", WebhookSettings(), fake_resolver(ip))


@pytest.mark.parametrize("ip", ["64:ff9b::5db8:d70e", "2002:5db8:d70e::1"])
def test_ipv6_forms_embedding_a_public_ipv4_are_judged_by_it(ip):
    assert resolve_target("https://hooks.example.com/x", WebhookSettings(), fake_resolver(ip))[2] == ip


def test_an_embedded_address_can_be_allowed_explicitly():
    settings = WebhookSettings(allow_hosts=["10.0.0.0/8"])
    resolve_target("http://svc.internal/", settings, fake_resolver("64:ff9b::a00:7"))


# -- per-POST deadline, per-host cap --------------------------------------------------------


@pytest.mark.parametrize("endless", [False, True])
def test_a_slow_drip_endpoint_is_cut_at_the_deadline_and_retried(r, endless):
    hook = WebhookReceiver()
    drip = FaultProxy(hook.url)
    # Each byte arrives well within the 1 s socket timeout, the whole answer takes ~8 s or never ends.
    drip.rule = lambda method, path: Fault(drip_s=0.1, endless=endless)
    dispatcher, scheduled = make(r, timeout_s=1.0)
    url = f"{drip.url}/hook"
    outcome = dispatcher.deliver(Delivery.new("v-d:1-0", url, "{}", tenant=None))
    assert outcome == "retry"
    ((following, _),) = scheduled
    assert following.attempt == 2 and following.last_error.startswith("deadline")
    assert r.zcard(keys.webhook_host_slots(urlsplit(url).netloc)) == 0  # its host slot is free again
    drip.stop()
    hook.stop()


def test_over_the_per_host_cap_a_delivery_is_rescheduled_not_posted(r):
    hook = WebhookReceiver()
    dispatcher, scheduled = make(r, max_per_host=1)
    slots = keys.webhook_host_slots(f"127.0.0.1:{hook.port}")
    r.zadd(slots, {"another-dispatcher": (time.time() + 60) * 1000})  # one POST in flight elsewhere
    d = Delivery.new("v-h:1-0", hook.url, "{}", tenant=None)
    assert dispatcher.deliver(d) == "throttled"
    ((again, countdown),) = scheduled
    assert again == d and 0 < countdown <= 1.5 and hook.requests == []
    assert r.ttl(keys.delivery_lease(d.delivery_id)) == -2  # its lease is not held while it waits
    r.zadd(slots, {"another-dispatcher": (time.time() - 1) * 1000})  # that dispatcher died: slot expired
    assert dispatcher.deliver(again) == "delivered"
    hook.stop()


# -- nothing lost: claims, dead letters ------------------------------------------------------


class FlakySchedule(Scheduled):
    def __init__(self, failures):
        super().__init__()
        self.failures = failures

    def __call__(self, delivery, countdown):
        if self.failures:
            self.failures -= 1
            raise OperationalError("broker unreachable")
        super().__call__(delivery, countdown)


def test_a_retry_claim_is_rolled_back_when_scheduling_fails(r):
    hook = WebhookReceiver(default=503)
    schedule = FlakySchedule(failures=1)
    dispatcher = Dispatcher(r, WebhookSettings(allow_hosts=["127.0.0.1"], backoff_base_s=1.0), schedule)
    d = Delivery.new("v-c:1-0", hook.url, "{}", tenant=None)
    with pytest.raises(OperationalError):
        dispatcher.deliver(d)  # the task fails and its message is requeued...
    assert dispatcher.deliver(d) == "retry"  # ...and the redelivered copy can still schedule attempt 2
    assert dispatcher.deliver(d) == "retry"
    assert [x.attempt for x, _ in schedule] == [2]  # once: the claim still stops forks
    hook.stop()


def test_a_hop_claim_is_rolled_back_when_scheduling_fails(r):
    schedule = FlakySchedule(failures=1)
    dispatcher = Dispatcher(r, WebhookSettings(), schedule)
    d = Delivery.new("v-c:2-0", "http://127.0.0.1:9/x", "{}", tenant=None).model_copy(
        update={"not_before": time.time() + 3 * MAX_HOP_S}
    )
    with pytest.raises(OperationalError):
        dispatcher.deliver(d)
    assert dispatcher.deliver(d) == "waiting" and len(schedule) == 1


def test_the_dead_letter_stream_is_capped(r):
    dispatcher, _ = make(r, dead_maxlen=10, resolver=fake_resolver("10.9.9.9"))
    for i in range(500):
        assert (
            dispatcher.deliver(Delivery.new(f"v-m:{i}-0", "http://internal.example/", "{}", None)) == "dead"
        )
    assert r.xlen(keys.WEBHOOK_DEAD_STREAM) < 500


def test_a_refused_callback_is_dead_lettered_once_per_scope_without_bodies(r):
    dispatcher, _ = make(r)
    for _ in range(5):
        dispatcher.refuse_once("http://u:p@10.0.0.1/cb", "private", "message-1", 5, request_id="req-1")
    dispatcher.refuse_once("http://10.0.0.1/cb", "private", "message-2", 1)
    first, _ = r.xrange(keys.WEBHOOK_DEAD_STREAM)
    assert first[1][b"url"] == b"http://10.0.0.1/cb" and first[1][b"request_id"] == b"req-1"
    assert b"delivery" not in first[1] and first[1][b"events"] == b"5"
    assert dispatcher.replay() == []  # nothing to replay: there is no delivery in it
    assert r.xlen(keys.WEBHOOK_DEAD_STREAM) == 2


def _readme_snippets(language):
    text = (Path(__file__).resolve().parents[2] / "docs" / "webhooks.md").read_text()
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def test_the_readme_snippets_verify_a_real_delivery(r, tmp_path):
    hook = WebhookReceiver()
    dispatcher, _ = make(r, secret="new-secret-0123456789", rotation_secrets=["old-secret-0123456789"])
    dispatcher.deliver(Delivery.new("v-readme:1-0", hook.url, '{"id": "v-readme", "x": "ü"}', tenant=None))
    (req,) = hook.requests
    body, header = req["body"], req["headers"]["Modgate-Signature"]
    (python,) = [s for s in _readme_snippets("python") if "def verify(" in s]
    scope = {}
    exec(python, scope)
    assert scope["verify"]([b"old-secret-0123456789"], body, header) and scope["verify"](
        [b"new-secret-0123456789"], body, header
    )
    assert not scope["verify"]([b"other-secret-0123456"], body, header)
    assert not scope["verify"]([b"new-secret-0123456789"], body, None) and not scope["verify"](
        [b"x"], body, "t=1,v1"
    )
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the Node snippet is not checked")
    (js,) = _readme_snippets("js")
    (tmp_path / "body").write_bytes(body)
    script = tmp_path / "verify.js"
    script.write_text(
        js + "\nconst [s, f, h] = process.argv.slice(2);\n"
        "process.stdout.write(String(verifyModgate([s], require('node:fs').readFileSync(f), h)));\n"
    )

    def run(secret, header):
        out = subprocess.run(
            [node, script, secret, tmp_path / "body", header], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert run("old-secret-0123456789", header) == run("new-secret-0123456789", header) == "true"
    assert (
        run("other-secret-0123456", header)
        == run("new-secret-0123456789", "t=abc,v1=00")
        == run("new-secret-0123456789", "")
        == "false"
    )
    hook.stop()


def test_a_redis_restart_right_after_the_post_does_not_post_again(tmp_path):
    """Redis goes away while the endpoint is answering: the done marker and the slot and
    lease releases wait for it to come back instead of failing the delivery, which would
    be re-queued and POSTed a second time."""
    import threading

    from tests.servers import RedisServer

    server = RedisServer(tmp_path, appendonly=True, appendfsync="always")
    try:

        def restart_in_the_background() -> None:
            server.kill()
            threading.Thread(target=server.start, daemon=True).start()

        hook = WebhookReceiver(before_answer=restart_in_the_background)
        client = redis.Redis.from_url(server.url, socket_timeout=5)
        dispatcher, scheduled = make(client)
        d = Delivery.new("verdict-r", hook.url, '{"id": "verdict-r"}', tenant=None)
        assert dispatcher.deliver(d) == "delivered"
        hook.before_answer = None
        assert dispatcher.deliver(d) == "duplicate"
        assert len(hook.requests) == 1 and not scheduled
        hook.stop()
    finally:
        server.stop()


def test_a_delivery_lost_in_transit_is_resent_until_it_settles(r):
    """kombu can lose a webhook task popped just before Redis or the worker died: every
    scheduled delivery stays pending until it is delivered or dead-lettered, and the
    reconciler re-sends one still pending long after it was due."""
    from modgate import keys

    hook = WebhookReceiver()
    dispatcher, scheduled = make(r)
    d = Delivery.new("verdict-lost", hook.url, '{"id": "verdict-lost"}', tenant=None)
    dispatcher.send(d, 0.0)  # ... and the task never reaches a dispatcher
    assert dispatcher.resend_lost(quiet_s=60) == []  # not yet quiet for long
    assert dispatcher.resend_lost(quiet_s=60, now=time.time() + 61) == [d.delivery_id]
    assert len(scheduled) == 2 and scheduled[1][0].delivery_id == d.delivery_id
    assert dispatcher.deliver(scheduled[1][0]) == "delivered"
    assert r.zcard(keys.WEBHOOK_PENDING) == 0 and r.hlen(keys.WEBHOOK_PENDING_PAYLOADS) == 0
    assert dispatcher.resend_lost(quiet_s=0, now=time.time() + 1000) == []
    assert len(hook.requests) == 1
    hook.stop()


def test_a_retry_keeps_its_delivery_pending_with_the_latest_payload(r):
    from modgate import keys

    hook = WebhookReceiver(responses=[503])
    dispatcher, _ = make(r)
    d = Delivery.new("verdict-p", hook.url, '{"id": "verdict-p"}', tenant=None)
    dispatcher.send(d, 0.0)
    assert dispatcher.deliver(d) == "retry"
    stored = Delivery.model_validate_json(r.hget(keys.WEBHOOK_PENDING_PAYLOADS, d.delivery_id))
    assert stored.attempt == 2
    assert r.zscore(keys.WEBHOOK_PENDING, d.delivery_id) > time.time()  # due after its backoff
    assert dispatcher.deliver(stored.model_copy(update={"not_before": 0.0})) == "delivered"
    assert r.zcard(keys.WEBHOOK_PENDING) == 0
    hook.stop()


def test_a_copy_sent_after_a_lost_done_marker_is_the_same_event_and_claim_event_takes_it_once(r):
    """At least once: a dispatcher that dies between the receiver's 2xx and its done marker
    sends the event again. The copy carries the same event id and body, and a receiver
    deduplicating with ``claim_event`` (on its own Redis) processes it once; a first copy
    whose processing failed and was released lets the next copy through."""
    from modgate.signing import claim_event, event_id, release_event, verify_headers

    hook = WebhookReceiver()
    dispatcher, _ = make(r)
    delivery = Delivery.new("v-copy:1-0", hook.url, '{"id": "v-copy"}', tenant=None)
    assert dispatcher.deliver(delivery) == "delivered"
    r.delete(keys.delivered_marker(delivery.delivery_id))  # the process died before writing it
    assert dispatcher.deliver(delivery) == "delivered"
    first, copy = hook.requests
    assert first["body"] == copy["body"] and event_id(first["headers"]) == event_id(copy["headers"])
    assert event_id(first["headers"]) == first["headers"]["Modgate-Event-Id"] == "v-copy:1-0"

    processed = []
    for req in hook.requests:
        verified = verify_headers("s3cr3t-s3cr3t-s3cr3t", req["body"], req["headers"])
        if verified and claim_event(r, req["headers"]):
            processed.append(req["body"])
    assert processed == [first["body"]]
    assert 0 < r.ttl("modgate:received:v-copy:1-0") <= 7 * 24 * 3600

    release_event(r, first["headers"])  # processing of the first copy failed
    assert claim_event(r, copy["headers"]) and not claim_event(r, copy["headers"])
    assert claim_event(r, {}) and claim_event(r, {})  # no event id: never taken for a copy
