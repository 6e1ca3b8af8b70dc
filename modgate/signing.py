"""Signing and verifying modgate webhooks: the public helper for receivers.

Standard library only, so a receiver can import it without the worker's dependencies
(``from modgate.signing import verify_headers``) or copy this one file.

Every delivery is signed twice, once per scheme, and once per active secret within each
(during a rotation there are several; any one matching is enough):

* ``Modgate-Signature: t=<unix>,v1=<hex>[,v1=<hex>...]``: HMAC-SHA256 over
  ``"<t>.<body>"``, keyed by the secret string's UTF-8 bytes. Stripe's
  ``WebhookSignature.verify_header`` accepts it as is.
* Standard Webhooks (``webhook-id``, ``webhook-timestamp``,
  ``webhook-signature: v1,<base64> [v1,<base64>...]``): HMAC-SHA256 over
  ``"<id>.<timestamp>.<body>"``, keyed by the bytes of a ``whsec_<base64>`` secret, or
  by the UTF-8 bytes of any other secret (give a Standard Webhooks library
  ``"whsec_" + base64(secret)``, see ``standard_secret``).

A secret given as ``str`` is the configured secret; as ``bytes``, the key itself. Every
key must hold at least ``MIN_SECRET_BYTES`` bytes: a shorter or empty one (an unset
environment variable) raises ``ValueError`` when signing or verifying, because with an
empty key anyone can forge a valid signature. Verification never raises otherwise: a
missing or malformed header is ``False``.

Deliveries are at least once: a dispatcher that dies between the receiver's 2xx and its
own record of it sends that event again, with the same event id and the same body.
``claim_event`` / ``release_event`` make deduplicating one line for a receiver with a Redis
(or anything with redis-py's ``set(name, value, nx=, ex=)`` and ``delete``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Iterable, Mapping
from typing import Any

SIGNATURE_HEADER = "Modgate-Signature"
EVENT_HEADER = "Modgate-Event-Id"
# Longer than the dispatcher's retry horizon (MODGATE_WEBHOOK__MAX_AGE_S, 24 h by default)
# with room for a dead letter replayed within the week.
EVENT_TTL_S = 7 * 24 * 3600
EVENT_KEY_PREFIX = "modgate:received:"
WHSEC_PREFIX = "whsec_"
# 128 bits: HMAC-SHA256's security strength is the key's length up to 256 bits (NIST SP
# 800-107r1 5.3.4), so shorter keys are the weak link. Standard Webhooks secrets decode
# to 24-64 bytes, Stripe's whsec_ strings are longer, `openssl rand -hex 16` gives 32.
MIN_SECRET_BYTES = 16

Secret = str | bytes
Secrets = Secret | Iterable[Secret]


def _long_enough(key: bytes, what: str) -> bytes:
    if len(key) < MIN_SECRET_BYTES:
        raise ValueError(f"{what} holds {len(key)} bytes; a signing secret needs at least {MIN_SECRET_BYTES}")
    return key


def modgate_key(secret: Secret) -> bytes:
    """The ``Modgate-Signature`` key of ``secret``; ValueError under ``MIN_SECRET_BYTES``."""
    return _long_enough(secret if isinstance(secret, bytes) else secret.encode(), "the secret")


def standard_key(secret: Secret) -> bytes:
    """The Standard Webhooks key of ``secret``; ValueError for a ``whsec_`` secret that is not
    base64, or a key shorter than ``MIN_SECRET_BYTES``."""
    if isinstance(secret, bytes):
        return _long_enough(secret, "the secret")
    if not secret.startswith(WHSEC_PREFIX):
        return _long_enough(secret.encode(), "the secret")
    encoded = secret[len(WHSEC_PREFIX) :]
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a whsec_ secret must be base64 after the prefix") from None
    return _long_enough(key, "the base64 of the whsec_ secret")


def standard_secret(secret: str) -> str:
    """What to give a Standard Webhooks library for a configured modgate ``secret``."""
    if secret.startswith(WHSEC_PREFIX):
        return secret
    return WHSEC_PREFIX + base64.b64encode(secret.encode()).decode()


def check_secret(secret: Secret) -> None:
    """Raise ``ValueError`` unless ``secret`` gives keys of at least ``MIN_SECRET_BYTES``
    under both schemes (start-up checks of settings)."""
    modgate_key(secret)
    standard_key(secret)


def _all(secrets: Secrets) -> list[Secret]:
    return [secrets] if isinstance(secrets, str | bytes) else list(secrets)


def _mac_hex(key: bytes, *parts: bytes) -> str:
    return hmac.new(key, b".".join(parts), hashlib.sha256).hexdigest()


def _mac_b64(key: bytes, *parts: bytes) -> str:
    return base64.b64encode(hmac.new(key, b".".join(parts), hashlib.sha256).digest()).decode()


def sign(secrets: Secrets, body: bytes, timestamp: int) -> str:
    """``Modgate-Signature``: one ``v1`` per secret."""
    stamp = str(timestamp).encode()
    return ",".join(
        [f"t={timestamp}", *(f"v1={_mac_hex(modgate_key(s), stamp, body)}" for s in _all(secrets))]
    )


def sign_standard(secrets: Secrets, msg_id: str, body: bytes, timestamp: int) -> str:
    """``webhook-signature``: one ``v1,<base64>`` per secret, space-separated."""
    stamp = str(timestamp).encode()
    return " ".join(f"v1,{_mac_b64(standard_key(s), msg_id.encode(), stamp, body)}" for s in _all(secrets))


def _fresh(timestamp: int, tolerance_s: float, now: float | None) -> bool:
    return abs((time.time() if now is None else now) - timestamp) <= tolerance_s


def verify(
    secrets: Secrets, body: bytes, header: str | None, tolerance_s: float = 300, now: float | None = None
) -> bool:
    """Check a ``Modgate-Signature`` header against any of ``secrets``."""
    keys = [modgate_key(s) for s in _all(secrets)]  # a short secret raises: a setup error
    if not header:
        return False
    try:
        pairs = [part.strip().split("=", 1) for part in header.split(",")]
        (stamp,) = [value for name, value in pairs if name == "t"]
        timestamp = int(stamp)
        given = [value for name, value in pairs if name == "v1"]
    except (ValueError, TypeError, AttributeError):
        return False
    if not given or not _fresh(timestamp, tolerance_s, now):
        return False
    expected = [_mac_hex(key, stamp.encode(), body) for key in keys]
    return any(hmac.compare_digest(e.encode(), g.encode()) for e in expected for g in given)


def verify_standard(
    secrets: Secrets,
    body: bytes,
    headers: Mapping[str, str],
    tolerance_s: float = 300,
    now: float | None = None,
) -> bool:
    """Check the Standard Webhooks headers against any of ``secrets``."""
    keys = [standard_key(s) for s in _all(secrets)]  # a short or non-base64 secret raises
    lower = {k.lower(): v for k, v in headers.items()}
    msg_id, stamp, header = (lower.get(n) for n in ("webhook-id", "webhook-timestamp", "webhook-signature"))
    if not (msg_id and stamp and header):
        return False
    try:
        timestamp = int(stamp)
        given = [v.split(",", 1)[1] for v in header.split() if v.startswith("v1,")]
    except (ValueError, TypeError, AttributeError):
        return False
    if not given or not _fresh(timestamp, tolerance_s, now):
        return False
    expected = [_mac_b64(key, msg_id.encode(), stamp.encode(), body) for key in keys]
    return any(hmac.compare_digest(e.encode(), g.encode()) for e in expected for g in given)


def verify_headers(
    secrets: Secrets,
    body: bytes,
    headers: Mapping[str, str],
    tolerance_s: float = 300,
    now: float | None = None,
) -> bool:
    """Check a delivery's headers: the Standard Webhooks signature when present (it also
    covers the event id), else ``Modgate-Signature``."""
    lower = {k.lower(): v for k, v in headers.items()}
    if "webhook-signature" in lower:
        return verify_standard(secrets, body, lower, tolerance_s, now)
    return verify(secrets, body, lower.get(SIGNATURE_HEADER.lower()), tolerance_s, now)


def event_id(headers: Mapping[str, str]) -> str | None:
    """A delivery's event id: ``webhook-id`` (covered by the Standard Webhooks signature)
    when present, else ``Modgate-Event-Id``; the same value on every copy of one event."""
    lower = {k.lower(): v for k, v in headers.items()}
    return lower.get("webhook-id") or lower.get(EVENT_HEADER.lower()) or None


def claim_event(store: Any, headers: Mapping[str, str], ttl_s: int = EVENT_TTL_S) -> bool:
    """True the first time this event id is claimed, False for a copy already claimed:
    ``SET <prefix><id> 1 NX EX ttl_s`` on ``store`` (a redis-py client). Verify the
    signature first; answer 2xx to a copy without processing it again. If processing the
    first copy fails, ``release_event`` so that the next retry is processed. An event
    without an id is never a copy (True)."""
    eid = event_id(headers)
    if eid is None:
        return True
    return bool(store.set(EVENT_KEY_PREFIX + eid, 1, nx=True, ex=ttl_s))


def release_event(store: Any, headers: Mapping[str, str]) -> None:
    """Forget a claimed event (its processing failed): the dispatcher's retry will be taken."""
    eid = event_id(headers)
    if eid is not None:
        store.delete(EVENT_KEY_PREFIX + eid)
