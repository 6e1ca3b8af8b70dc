"""Webhook delivery: signing, the SSRF guard, one delivery attempt with its outcome,
retries with backoff, the dead-letter stream and its replay.

Nothing here knows Celery: ``deliver`` is handed a ``schedule`` function that puts a
delivery back on the webhook queue. Duplicate copies of a delivery (a redelivered
message, a retry scheduled twice, kombu restoring a long-ETA message early) are made
harmless by three Redis keys: a done marker (delivered or dead-lettered), a lease held
while POSTing, and a claim per scheduled retry so the retry chain cannot fork.

Receivers verify a delivery like this (the README has the same snippet)::

    import hashlib, hmac, time
    def verify(secret: bytes, body: bytes, header: str, tolerance: int = 300) -> bool:
        fields = dict(part.split("=", 1) for part in header.split(","))
        expected = hmac.new(secret, fields["t"].encode() + b"." + body, hashlib.sha256).hexdigest()
        fresh = abs(time.time() - int(fields["t"])) <= tolerance
        return fresh and hmac.compare_digest(expected, fields["v1"])
"""

from __future__ import annotations

import email.utils
import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import random
import socket
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatch
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field

from worker import keys
from worker.settings import WebhookSettings

log = logging.getLogger(__name__)

EVENT_HEADER = "Modgate-Event-Id"
SIGNATURE_HEADER = "Modgate-Signature"
DELIVERY_HEADER = "Modgate-Delivery-Attempt"

# Waits longer than this are split into hops: a Celery countdown beyond the Redis
# visibility timeout would be handed out twice by kombu. The service lowers it to half
# the visibility timeout when that is shorter.
MAX_HOP_S = 120.0

Outcome = Literal["delivered", "retry", "dead", "duplicate", "busy", "waiting"]


class Delivery(BaseModel):
    """One verdict on its way to one URL; travels as the webhook task's argument."""

    delivery_id: str
    event_id: str
    url: str
    tenant: str | None = None
    body: str
    # Who started this retry chain: the verdict for first deliveries, the dead letter for replays.
    chain: str
    attempt: int = Field(1, ge=1)
    hop: int = 0
    first_at: float
    not_before: float = 0.0
    last_error: str | None = None

    @classmethod
    def new(
        cls, event_id: str, url: str, body: str, tenant: str | None, chain: str | None = None
    ) -> Delivery:
        delivery_id = hashlib.sha256(f"{event_id}\x00{url}".encode()).hexdigest()[:32]
        return cls(
            delivery_id=delivery_id,
            event_id=event_id,
            url=url,
            tenant=tenant,
            body=body,
            chain=chain or event_id,
            first_at=time.time(),
        )


class WebhookRefused(Exception):
    """A callback URL the SSRF guard or the host allowlist does not accept."""


# -- signing ------------------------------------------------------------------------------


def sign(secret: bytes, body: bytes, timestamp: int) -> str:
    mac = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: bytes, body: bytes, header: str, tolerance_s: int = 300, now: float | None = None) -> bool:
    try:
        fields = dict(part.split("=", 1) for part in header.split(","))
        timestamp = int(fields["t"])
        given = fields["v1"]
    except (KeyError, ValueError):
        return False
    expected = hmac.new(secret, fields["t"].encode() + b"." + body, hashlib.sha256).hexdigest()
    fresh = abs((now if now is not None else time.time()) - timestamp) <= tolerance_s
    return fresh and hmac.compare_digest(expected, given)


# -- SSRF guard ---------------------------------------------------------------------------


def _allowed_explicitly(
    host: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address, allow: list[str]
) -> bool:
    for entry in allow:
        if entry == host:
            return True
        try:
            if ip in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue
    return False


def _public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def resolve_target(
    url: str, settings: WebhookSettings, resolver: Callable[..., Any] = socket.getaddrinfo
) -> tuple[str, int, str]:
    """Check ``url`` against the allowlists and return (host, port, ip) to connect to.

    The caller connects to the returned IP, not to the name, so a DNS answer that
    changes between the check and the connection (rebinding) cannot bypass the guard."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookRefused(f"not an http(s) URL: {url}")
    host = parts.hostname.lower()
    if not any(fnmatch(host, pattern.lower()) for pattern in settings.hosts):
        raise WebhookRefused(f"host {host} is not in webhook.hosts")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = resolver(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise WebhookRefused(f"cannot resolve {host}: {exc}") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if not addresses:
        raise WebhookRefused(f"{host} resolves to no address")
    for ip in addresses:
        if not _public(ip) and not _allowed_explicitly(host, ip, settings.allow_hosts):
            raise WebhookRefused(
                f"{host} resolves to {ip}, a loopback/private/link-local/multicast address "
                "(add it to webhook.allow_hosts to allow it)"
            )
    return host, port, str(addresses[0])


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


def post(url: str, ip: str, body: bytes, headers: dict[str, str], timeout_s: float) -> Attempt:
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
    try:
        conn.request("POST", path, body=body, headers=all_headers)
        response = conn.getresponse()
        response.read(64 * 1024)
        error = None if 200 <= response.status < 300 else f"HTTP {response.status} {response.reason}"
        return Attempt(response.status, error, _retry_after(response.getheader("Retry-After")))
    except (OSError, http.client.HTTPException) as exc:
        return Attempt(None, f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()


# -- the delivery state machine -----------------------------------------------------------

# KEYS: lease. ARGV: token. Deletes the lease only if this process still holds it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

Schedule = Callable[[Delivery, float], None]


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

    def backoff(self, attempt: int) -> float:
        """Exponential with full jitter over the upper half: attempt 1 waits ~base, doubling."""
        ceiling = min(self.settings.backoff_max_s, self.settings.backoff_base_s * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)

    def deliver(self, delivery: Delivery) -> Outcome:
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
            self.schedule(delivery, min(self.max_hop_s, max(1.0, remaining_ms / 1000.0 + 1.0)))
            return "busy"
        try:
            if self.redis.exists(done):  # finished between our check and the lease
                return "duplicate"
            return self._attempt(delivery, done)
        finally:
            self._release(keys=[lease], args=[token])

    def _attempt(self, delivery: Delivery, done: str) -> Outcome:
        try:
            _, _, ip = resolve_target(delivery.url, self.settings, self.resolver)
        except WebhookRefused as exc:
            log.warning("webhook %s refused: %s", delivery.delivery_id, exc)
            return self._dead(delivery.model_copy(update={"last_error": f"refused: {exc}"}), done)
        body = delivery.body.encode()
        headers = {
            EVENT_HEADER: delivery.event_id,
            DELIVERY_HEADER: str(delivery.attempt),
        }
        secret = self.settings.secret_for(delivery.tenant)
        if secret is not None:
            headers[SIGNATURE_HEADER] = sign(secret.get_secret_value().encode(), body, int(time.time()))
        result = post(delivery.url, ip, body, headers, self.settings.timeout_s)
        if result.ok:
            self.redis.set(done, "delivered", ex=self.marker_ttl_s)
            return "delivered"
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
        if self.redis.set(claim, "1", nx=True, ex=self.marker_ttl_s):
            self.schedule(following, min(wait, self.max_hop_s))
        return "retry"

    def _hop(self, delivery: Delivery, remaining: float) -> Outcome:
        following = delivery.model_copy(update={"hop": delivery.hop + 1})
        claim = (
            keys.retry_claim(delivery.delivery_id, delivery.chain, delivery.attempt) + f":hop{following.hop}"
        )
        if self.redis.set(claim, "1", nx=True, ex=self.marker_ttl_s):
            self.schedule(following, min(remaining, self.max_hop_s))
        return "waiting"

    def _dead(self, delivery: Delivery, done: str) -> Outcome:
        fields = {
            "delivery": delivery.model_dump_json(),
            "delivery_id": delivery.delivery_id,
            "event_id": delivery.event_id,
            "url": delivery.url,
            "attempts": str(delivery.attempt),
            "last_error": delivery.last_error or "",
            "failed_at": str(time.time()),
        }
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(self.dead_stream, fields)
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

    def replay(self, entry_ids: list[str] | None = None, limit: int = 1000) -> list[str]:
        """Re-send dead letters (all, or the given stream entry ids) as fresh delivery chains."""
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
            self.schedule(fresh, 0.0)
            self.redis.xdel(self.dead_stream, entry_id)
            replayed.append(entry_id)
        return replayed
