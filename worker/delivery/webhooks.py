"""Webhook delivery: signatures at send time, the SSRF guard, one delivery
attempt with a wall-clock deadline, the per-host concurrency cap, retries with backoff,
the dead-letter stream and its replay.

Nothing here knows Celery: ``deliver`` is handed a ``schedule`` function that puts a
delivery back on the webhook queue. Duplicate copies of a delivery (a redelivered
message, a retry scheduled twice, kombu restoring a long-ETA message early) are made
harmless by three Redis keys: a done marker (delivered or dead-lettered), a lease held
while POSTing, and a claim per scheduled retry so the retry chain cannot fork.

One delivery is one published stream entry to one URL: the event id is
``<verdict id>:<stream entry id>``, so a later verdict for the same object (an ``ok``
after a ``timeout``) is a new event, and every copy of one entry carries the same body,
the entry as stored. Receivers verify with ``modgate.signing``. The envelope (``Delivery``,
headers, event types) and ``queue_delivery`` live in ``modgate.envelope``, because the review
console queues ``verdict.reviewed`` deliveries too; this module re-exports them.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import http.client
import ipaddress
import json
import logging
import random
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatch
from typing import Any, Literal
from urllib.parse import urlsplit

from modgate import keys
from modgate.envelope import (
    DELIVERY_HEADER,
    ENVELOPE,
    EVENT_TYPE_HEADER,
    EVENT_TYPES,
    RESERVED_EVENT_TYPES,
    VERDICT_CREATED,
    VERDICT_HEADER,
    VERDICT_REVIEWED,
    Delivery,
    event_id,
    queue_delivery,
    strip_userinfo,
)
from modgate.settings import WebhookSettings
from modgate.signing import SIGNATURE_HEADER, sign, sign_standard, verify

# The envelope moved to modgate.envelope (the console queues deliveries too); its names stay
# importable from here for existing callers.
__all__ = [
    "DELIVERY_HEADER",
    "ENVELOPE",
    "EVENT_TYPES",
    "EVENT_TYPE_HEADER",
    "RESERVED_EVENT_TYPES",
    "SIGNATURE_HEADER",
    "VERDICT_CREATED",
    "VERDICT_HEADER",
    "VERDICT_REVIEWED",
    "Delivery",
    "event_id",
    "queue_delivery",
    "sign",
    "sign_standard",
    "strip_userinfo",
    "verify",
]

log = logging.getLogger(__name__)

# Waits longer than this are split into hops: a Celery countdown beyond the Redis
# visibility timeout would be handed out twice by kombu. The service lowers it to half
# the visibility timeout when that is shorter.
MAX_HOP_S = 120.0

Outcome = Literal["delivered", "retry", "dead", "duplicate", "busy", "waiting", "throttled"]


class WebhookRefused(Exception):
    """A callback URL the SSRF guard or the host allowlist does not accept."""


class Unresolvable(WebhookRefused):
    """The host did not resolve (may pass: DNS trouble is retried, not a policy refusal)."""


def unsigned_warning(settings: WebhookSettings) -> str | None:
    """What to warn about at start-up when some deliveries would go out unsigned."""
    if settings.secret is None:
        tenants = sorted(settings.secrets)
        signed = f" (only tenants {', '.join(tenants)} have secrets)" if tenants else ""
        return (
            "MODGATE_WEBHOOK__SECRET is not set: webhooks go out unsigned" + signed + "; receivers "
            "cannot tell them from forgeries"
        )
    return None


# -- SSRF guard ---------------------------------------------------------------------------

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")

IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def _rfc6052(address: int, prefix_len: int) -> ipaddress.IPv4Address:
    """The IPv4 address inside an RFC 6052 IPv4-embedded IPv6 address of a /``prefix_len`` prefix."""
    if prefix_len == 96:
        return ipaddress.IPv4Address(address & 0xFFFFFFFF)
    # Bits 64..71 are the reserved "u" octet: squeeze it out, then read 32 bits after the prefix.
    squeezed = ((address >> 64) << 56) | (address & ((1 << 56) - 1))
    return ipaddress.IPv4Address((squeezed >> (120 - prefix_len - 32)) & 0xFFFFFFFF)


def embedded_ipv4(ip: IP) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address carries (mapped, NAT64, 6to4, Teredo, IPv4-compatible);
    a connection to it may reach them, so the guard judges them, not the IPv6 form."""
    if isinstance(ip, ipaddress.IPv4Address):
        return []
    if ip.ipv4_mapped is not None:
        return [ip.ipv4_mapped]
    if ip in _NAT64 or ip in _IPV4_COMPATIBLE:
        return [_rfc6052(int(ip), 96)]
    if ip in _NAT64_LOCAL:
        # Local-use prefix: the operator's prefix length is unknown, so every RFC 6052 position counts.
        return [_rfc6052(int(ip), n) for n in (48, 56, 64, 96)]
    if ip.sixtofour is not None:
        return [ip.sixtofour]
    if ip.teredo is not None:
        return list(ip.teredo)  # server and client
    return []


def _allowed_explicitly(host: str, ip: IP, allow: list[str]) -> bool:
    for entry in allow:
        if entry == host:
            return True
        try:
            network = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            continue
        if ip in network or any(v4 in network for v4 in embedded_ipv4(ip)):
            return True
    return False


def _public(ip: IP) -> bool:
    inner = embedded_ipv4(ip)
    if inner:
        return all(_public(v4) for v4 in inner)
    return ip.is_global and not ip.is_multicast


def resolve_target(
    url: str, settings: WebhookSettings, resolver: Callable[..., Any] = socket.getaddrinfo
) -> tuple[str, int, str]:
    """Check ``url`` against the allowlists and return (host, port, ip) to connect to.

    The caller connects to the returned IP, not to the name, so a DNS answer that
    changes between the check and the connection (rebinding) cannot bypass the guard."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookRefused(f"not an http(s) URL: {strip_userinfo(url)}")
    host = parts.hostname.lower()
    if not any(fnmatch(host, pattern.lower()) for pattern in settings.hosts):
        raise WebhookRefused(f"host {host} is not in webhook.hosts")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise WebhookRefused(f"bad port in {strip_userinfo(url)}") from None
    try:
        infos = resolver(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise Unresolvable(f"cannot resolve {host}: {exc}") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if not addresses:
        raise Unresolvable(f"{host} resolves to no address")
    for ip in addresses:
        if not _public(ip) and not _allowed_explicitly(host, ip, settings.allow_hosts):
            inner = embedded_ipv4(ip)
            embeds = f" (which embeds {', '.join(map(str, inner))})" if inner else ""
            raise WebhookRefused(
                f"{host} resolves to {ip}{embeds}, a loopback/private/link-local/multicast address "
                "(add it to webhook.allow_hosts to allow it)"
            )
    return host, port, str(addresses[0])


def policy_refusal(
    url: str, settings: WebhookSettings, resolver: Callable[..., Any] = socket.getaddrinfo
) -> str | None:
    """Why the policy refuses ``url`` (scheme, host allowlist, address class), or None.
    A name that does not resolve is not a policy refusal: the dispatcher retries it."""
    try:
        resolve_target(url, settings, resolver)
    except Unresolvable:
        return None
    except WebhookRefused as exc:
        return str(exc)
    return None


# -- one HTTP attempt ---------------------------------------------------------------------


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a pre-checked IP, with SNI and certificate checks against the host name."""

    def __init__(self, host: str, port: int, ip: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._ip = ip

    def connect(self) -> None:
        sock = socket.create_connection((self._ip, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Attempt:
    status: int | None
    error: str | None
    retry_after_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def retryable(self) -> bool:
        # Timeouts and connection errors (no status), 408, 425, 429 and 5xx are worth another try;
        # any other 4xx says the request itself is wrong.
        return self.status is None or self.status in (408, 425, 429) or self.status >= 500


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def post(
    url: str,
    ip: str,
    body: bytes,
    headers: dict[str, str],
    timeout_s: float,
    max_response_bytes: int = 64 * 1024,
) -> Attempt:
    """One POST that ends within ``timeout_s`` of wall-clock time, whatever the endpoint does.

    Socket timeouts bound each read, not the whole exchange: an endpoint that drips a byte
    every few seconds would hold the thread for hours. A timer shuts the socket down at
    the deadline, which ends any read or write in progress."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = _PinnedHTTPSConnection(host, port, ip, timeout_s)
    else:
        conn = http.client.HTTPConnection(ip, port, timeout=timeout_s)
    default_port = port == (443 if parts.scheme == "https" else 80)
    all_headers = {
        "Host": host if default_port else f"{host}:{port}",
        "Content-Type": "application/json",
        "User-Agent": "modgate-webhook/1",
        **headers,
    }
    expired = threading.Event()

    def cut() -> None:
        expired.set()
        sock = conn.sock
        if sock is not None:
            # The plain socket's shutdown: an SSL socket's would race the reading thread.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    timer = threading.Timer(timeout_s, cut)
    timer.daemon = True
    timer.start()
    try:
        conn.connect()
        if expired.is_set():
            raise TimeoutError("connected after the deadline")
        conn.request("POST", path, body=body, headers=all_headers)
        response = conn.getresponse()
        response.read(max_response_bytes)
        error = None if 200 <= response.status < 300 else f"HTTP {response.status} {response.reason}"
        return Attempt(response.status, error, _retry_after(response.getheader("Retry-After")))
    except (OSError, http.client.HTTPException, ValueError) as exc:
        if expired.is_set():
            return Attempt(None, f"deadline: no complete answer within {timeout_s:g} s")
        return Attempt(None, f"{type(exc).__name__}: {exc}")
    finally:
        timer.cancel()
        conn.close()


# -- the delivery state machine -----------------------------------------------------------

# KEYS: a lease or claim. ARGV: token. Deletes it only if this process still holds it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: the host's slot set. ARGV: cap, token, hold ms. A counting semaphore shared by every
# dispatcher; slots expire (score = expiry, Redis's clock) so a dead dispatcher's come back.
_TAKE_SLOT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
return 0
"""

Schedule = Callable[["Delivery", float], None]


class Dispatcher:
    def __init__(
        self,
        redis: Any,
        settings: WebhookSettings,
        schedule: Schedule,
        dead_stream: str = keys.WEBHOOK_DEAD_STREAM,
        marker_ttl_s: int = 7 * 24 * 3600,
        resolver: Callable[..., Any] = socket.getaddrinfo,
        max_hop_s: float = MAX_HOP_S,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.schedule = schedule
        self.dead_stream = dead_stream
        self.marker_ttl_s = marker_ttl_s
        self.resolver = resolver
        self.max_hop_s = max_hop_s
        self._release = redis.register_script(_RELEASE)
        self._take_slot = redis.register_script(_TAKE_SLOT)
        # url -> (checked at, refusal or None): the moderation path asks once per publish
        # round, and a slow or failing DNS must not hold every message up each time.
        self._checked: dict[str, tuple[float, str | None]] = {}
        self._checked_lock = threading.Lock()

    def policy_refusal(self, url: str, ttl_s: float = 30.0) -> str | None:
        """``policy_refusal`` of ``url``, remembered for ``ttl_s``."""
        now = time.monotonic()
        with self._checked_lock:
            hit = self._checked.get(url)
        if hit is not None and now - hit[0] < ttl_s:
            return hit[1]
        reason = policy_refusal(url, self.settings, self.resolver)
        with self._checked_lock:
            if len(self._checked) > 4096:
                self._checked.clear()
            self._checked[url] = (now, reason)
        return reason

    def backoff(self, attempt: int) -> float:
        """Exponential with full jitter over the upper half: attempt 1 waits ~base, doubling."""
        ceiling = min(self.settings.backoff_max_s, self.settings.backoff_base_s * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)

    def send(self, delivery: Delivery, countdown: float) -> None:
        """Put ``delivery`` on the webhook queue, noting it as pending first (see
        ``keys.WEBHOOK_PENDING``), so that a task lost in transit is re-sent by
        ``resend_lost``. Copies are harmless: the done marker and the lease see to that."""
        queue_delivery(self.redis, delivery, lambda d: self.schedule(d, countdown), countdown=countdown)

    def _settled(self, delivery_id: str) -> None:
        def forget() -> None:
            pipe = self.redis.pipeline(transaction=True)
            pipe.zrem(keys.WEBHOOK_PENDING, delivery_id)
            pipe.hdel(keys.WEBHOOK_PENDING_PAYLOADS, delivery_id)
            pipe.execute()

        _ride_over_redis_outage(forget)

    def resend_lost(self, quiet_s: float, now: float | None = None, limit: int = 500) -> list[str]:
        """Re-send deliveries still pending ``quiet_s`` after they were due: by then a task
        on the queue would have run, and one held by a dead worker would have been restored
        by the visibility timeout. Returns the delivery ids re-sent."""
        cutoff = (now if now is not None else time.time()) - quiet_s
        resent = []
        for raw in self.redis.zrangebyscore(keys.WEBHOOK_PENDING, "-inf", f"({cutoff}", start=0, num=limit):
            delivery_id = raw.decode() if isinstance(raw, bytes) else raw
            payload = self.redis.hget(keys.WEBHOOK_PENDING_PAYLOADS, delivery_id)
            if payload is None or self.redis.exists(keys.delivered_marker(delivery_id)):
                self._settled(delivery_id)
                continue
            self.send(Delivery.model_validate_json(payload), 0.0)
            resent.append(delivery_id)
        return resent

    def deliver(self, delivery: Delivery) -> Outcome:
        outcome = self._deliver(delivery)
        if outcome in ("delivered", "duplicate", "dead"):
            self._settled(delivery.delivery_id)
        return outcome

    def _deliver(self, delivery: Delivery) -> Outcome:
        done = keys.delivered_marker(delivery.delivery_id)
        if self.redis.exists(done):
            return "duplicate"
        now = time.time()
        if delivery.not_before > now + 0.5:
            return self._hop(delivery, delivery.not_before - now)
        lease = keys.delivery_lease(delivery.delivery_id)
        token = uuid.uuid4().hex
        if not self.redis.set(lease, token, nx=True, ex=int(self.settings.timeout_s) + 30):
            # Another copy is POSTing right now. Look again once its lease runs out: if its
            # process died, nobody else would ever finish this delivery.
            remaining_ms = self.redis.pttl(lease)
            self.send(delivery, min(self.max_hop_s, max(1.0, remaining_ms / 1000.0 + 1.0)))
            return "busy"
        try:
            if self.redis.exists(done):  # finished between our check and the lease
                return "duplicate"
            return self._attempt(delivery, done)
        finally:
            _ride_over_redis_outage(lambda: self._release(keys=[lease], args=[token]))

    def _attempt(self, delivery: Delivery, done: str) -> Outcome:
        try:
            host, port, ip = resolve_target(delivery.url, self.settings, self.resolver)
        except Unresolvable as exc:
            return self._failed(delivery, Attempt(None, str(exc)), done)
        except WebhookRefused as exc:
            log.warning("webhook %s refused: %s", delivery.delivery_id, exc)
            return self._dead(delivery.model_copy(update={"last_error": f"refused: {exc}"}), done)
        slots = keys.webhook_host_slots(f"{host}:{port}")
        slot = uuid.uuid4().hex
        hold_ms = int((self.settings.timeout_s + 30) * 1000)
        if not self._take_slot(keys=[slots], args=[self.settings.max_per_host, slot, hold_ms]):
            return self._throttled(delivery, done)
        try:
            body = delivery.body.encode()
            result = post(
                delivery.url,
                ip,
                body,
                delivery.headers(self.settings, int(time.time())),
                self.settings.timeout_s,
                self.settings.max_response_bytes,
            )
        finally:
            _ride_over_redis_outage(lambda: self.redis.zrem(slots, slot))
        if result.ok:
            _ride_over_redis_outage(lambda: self.redis.set(done, "delivered", ex=self.marker_ttl_s))
            return "delivered"
        return self._failed(delivery, result, done)

    def _failed(self, delivery: Delivery, result: Attempt, done: str) -> Outcome:
        failed = delivery.model_copy(update={"last_error": result.error})
        if not result.retryable:
            return self._dead(failed, done)
        wait = self.backoff(delivery.attempt)
        if result.retry_after_s is not None:
            wait = max(wait, result.retry_after_s)
        out_of_attempts = delivery.attempt >= self.settings.max_attempts
        too_old = time.time() + wait - delivery.first_at > self.settings.max_age_s
        if out_of_attempts or too_old:
            return self._dead(failed, done)
        following = failed.model_copy(
            update={"attempt": delivery.attempt + 1, "hop": 0, "not_before": time.time() + wait}
        )
        claim = keys.retry_claim(delivery.delivery_id, delivery.chain, following.attempt)
        self._schedule_once(claim, following, min(wait, self.max_hop_s))
        return "retry"

    def _throttled(self, delivery: Delivery, done: str) -> Outcome:
        """Over the host's cap: back on the queue, never a thread waiting for a slot."""
        if time.time() - delivery.first_at > self.settings.max_age_s:
            return self._dead(delivery.model_copy(update={"last_error": "host busy past max_age_s"}), done)
        self.send(delivery, min(self.max_hop_s, random.uniform(0.5, 1.5)))
        return "throttled"

    def _hop(self, delivery: Delivery, remaining: float) -> Outcome:
        following = delivery.model_copy(update={"hop": delivery.hop + 1})
        claim = keys.retry_claim(delivery.delivery_id, delivery.chain, delivery.attempt, following.hop)
        self._schedule_once(claim, following, min(remaining, self.max_hop_s))
        return "waiting"

    def _schedule_once(self, claim: str, delivery: Delivery, countdown: float) -> bool:
        """Schedule ``delivery`` unless another copy already did.

        The claim is only reserved (briefly) while scheduling, and made permanent once the
        delivery is on the queue; a failed schedule deletes it and raises, so the message is
        requeued and its next copy can claim again. A process dying in between leaves a
        reservation that expires before the message is handed out again (the visibility
        timeout is at least twice ``max_hop_s``)."""
        reservation = f"pending:{uuid.uuid4().hex}"
        if not self.redis.set(claim, reservation, nx=True, ex=max(1, int(self.max_hop_s))):
            return False
        try:
            self.send(delivery, countdown)
        except BaseException:
            try:
                self._release(keys=[claim], args=[reservation])
            except Exception as exc:  # Redis is down too: the reservation expires by itself
                log.warning("could not roll back retry claim %s: %s", claim, exc)
            raise
        self.redis.set(claim, "scheduled", ex=self.marker_ttl_s)
        return True

    def _dead(self, delivery: Delivery, done: str) -> Outcome:
        fields = {
            "kind": "delivery",
            "delivery": delivery.model_dump_json(),
            "delivery_id": delivery.delivery_id,
            "event_id": delivery.event_id,
            "url": delivery.url,
            "attempts": str(delivery.attempt),
            "last_error": delivery.last_error or "",
            "failed_at": str(time.time()),
        }
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(self.dead_stream, fields, maxlen=self.settings.dead_maxlen, approximate=True)
        pipe.set(done, "dead", ex=self.marker_ttl_s)
        pipe.execute()
        log.warning(
            "webhook %s to %s dead-lettered after %d attempt(s): %s",
            delivery.delivery_id,
            delivery.url,
            delivery.attempt,
            delivery.last_error,
        )
        return "dead"

    def dead_letter(self, delivery: Delivery, error: str) -> Outcome:
        """Dead-letter a delivery that could not be attempted (an internal error)."""
        done = keys.delivered_marker(delivery.delivery_id)
        return self._dead(delivery.model_copy(update={"last_error": error}), done)

    def dead_letter_raw(self, payload: Any, error: str) -> None:
        """A webhook task whose payload is not a delivery: kept (truncated) rather than dropped."""
        try:
            text = json.dumps(payload, default=str)
        except (TypeError, ValueError):
            text = repr(payload)
        fields = {
            "kind": "invalid",
            "payload": text[:65536],
            "last_error": error,
            "failed_at": str(time.time()),
        }
        self.redis.xadd(self.dead_stream, fields, maxlen=self.settings.dead_maxlen, approximate=True)

    def refuse_once(self, url: str, reason: str, scope: str, events: int, **context: str | None) -> bool:
        """A callback URL the policy refuses: one dead letter (no bodies: the verdicts are on
        the stream) per ``scope`` (a message), however many verdicts it has. True if this
        call wrote it."""
        url = strip_userinfo(url)
        marker = keys.webhook_refused(hashlib.sha256(f"{scope}\x00{url}".encode()).hexdigest()[:32])
        if not self.redis.set(marker, "1", nx=True, ex=self.marker_ttl_s):
            return False
        fields = {
            "kind": "refused",
            "url": url,
            "attempts": "0",
            "events": str(events),
            "last_error": f"refused: {reason}",
            "failed_at": str(time.time()),
            **{k: v for k, v in context.items() if v is not None},
        }
        self.redis.xadd(self.dead_stream, fields, maxlen=self.settings.dead_maxlen, approximate=True)
        log.warning("callback %s refused (once for this message, %d verdict(s)): %s", url, events, reason)
        return True

    def replay(self, entry_ids: list[str] | None = None, limit: int = 1000) -> list[str]:
        """Re-send dead letters (all, or the given stream entry ids) as fresh delivery chains.
        Refused callbacks and invalid payloads carry no delivery and are left in place."""
        if entry_ids:
            entries = []
            for entry_id in entry_ids:
                entries.extend(self.redis.xrange(self.dead_stream, entry_id, entry_id))
        else:
            entries = self.redis.xrange(self.dead_stream, count=limit)
        replayed: list[str] = []
        for raw_id, fields in entries:
            entry_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
            data = fields.get(b"delivery", fields.get("delivery"))
            if data is None:
                log.info("dead letter %s is not a delivery (refused or invalid): not replayed", entry_id)
                continue
            old = Delivery.model_validate(json.loads(data))
            fresh = old.model_copy(
                update={
                    "chain": f"replay-{entry_id}",
                    "attempt": 1,
                    "hop": 0,
                    "first_at": time.time(),
                    "not_before": 0.0,
                    "last_error": None,
                }
            )
            self.redis.delete(keys.delivered_marker(old.delivery_id))
            self.send(fresh, 0.0)
            self.redis.xdel(self.dead_stream, entry_id)
            replayed.append(entry_id)
        return replayed


# How long the bookkeeping after a POST keeps trying while Redis is away (a restart, a
# failover): longer than a restart takes, far shorter than a delivery's hop.
AFTER_POST_REDIS_RETRY_S = 30.0


def _ride_over_redis_outage(op: Callable[[], Any], deadline_s: float = AFTER_POST_REDIS_RETRY_S) -> Any:
    """Run an idempotent Redis write (done marker, slot and lease release) that follows a
    POST, retrying through connection errors for up to ``deadline_s``. Raising at once would
    re-queue a delivery the endpoint already accepted, and it would be POSTed again."""
    import redis as redis_lib

    end = time.monotonic() + deadline_s
    while True:
        try:
            return op()
        except (redis_lib.ConnectionError, redis_lib.TimeoutError):
            if time.monotonic() >= end:
                raise
            time.sleep(0.25)
