"""S3 event notifications in every shape they arrive in, parsed into object events.

Shapes: S3's ``Records`` (direct to SQS or Lambda, and MinIO/Ceph webhooks), the same
wrapped in an SNS envelope, EventBridge "Object Created" events, and Lambda's own
SQS/SNS batch wrappers around any of these. Only uploads count: ``s3:TestEvent``, every
non-create event and the metadata changes MinIO files under ``ObjectCreated`` (tagging,
retention, legal hold) are ignored, with a reason.

One record that is not a valid object event (wrong types, a bucket or key the queue
model refuses) is reported in ``Parsed.invalid`` with the reason and never spoils the
records around it; ``MalformedEvent`` is raised only when the body as a whole is no
notification. Keys are taken exactly as S3 stores them, control characters included (S3
allows them, and an upload refused here would never be moderated); logs escape them.

Keys in ``Records`` are URL-encoded by AWS and MinIO (space as ``+``, the rest
percent-escaped); Ceph RGW sends them as they are (suitenumerique/meet#1454), so they are
decoded according to ``eventSource``. EventBridge carries keys as they are.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

from pydantic import ValidationError

from modgate.contract import Item

# eventSource values whose keys arrive unencoded (a setting: producer.raw_key_sources).
RAW_KEY_SOURCES: tuple[str, ...] = ("ceph:s3",)
# MinIO reports these as s3:ObjectCreated:* although no content was written: moderating
# them would re-moderate an object for every tag (modgate's own tag action included).
METADATA_ONLY = frozenset({"PutTagging", "DeleteTagging", "PutRetention", "PutLegalHold"})
# Lambda → SQS → SNS → Records is the deepest real wrapping; more is not a notification.
MAX_WRAPPING = 4
MAX_SIZE = 2**63 - 1


class MalformedEvent(ValueError):
    """A body that is not any known notification shape."""


class InvalidRecord(ValueError):
    """One record that cannot become a queue item."""


@dataclass(frozen=True)
class ObjectEvent:
    bucket: str
    key: str
    version_id: str | None = None
    etag: str | None = None
    size: int | None = None
    event_name: str = ""

    def fingerprint(self) -> str:
        # Unambiguous with NULs in the key: bucket names and S3's version ids and ETags hold none.
        return f"{self.bucket}\x00{self.key}\x00{self.version_id or self.etag or ''}"

    def to_item(self) -> Item:
        """The queue item; raises ``InvalidRecord`` for what the queue model refuses."""
        for what, text in (("bucket", self.bucket), ("key", self.key)):
            if not isinstance(text, str):
                raise InvalidRecord(f"{what} is {type(text).__name__}, not a string")
        # No bucket name holds one (S3 allows lowercase letters, digits, "." and "-").
        bad = next((c for c in self.bucket if unicodedata.category(c) == "Cc"), None)
        if bad is not None:
            raise InvalidRecord(f"bucket contains the control character U+{ord(bad):04X}")
        try:
            return Item(
                bucket=self.bucket, key=self.key, version_id=self.version_id, etag=self.etag, size=self.size
            )
        except ValidationError as exc:
            reasons = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise InvalidRecord(reasons) from None


@dataclass(frozen=True)
class Rejected:
    """A record left out, where it was in the body, and why."""

    record: str
    reason: str


@dataclass
class Parsed:
    events: list[ObjectEvent] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    invalid: list[Rejected] = field(default_factory=list)

    def extend(self, other: Parsed, prefix: str = "") -> None:
        self.events.extend(other.events)
        self.ignored.extend(other.ignored)
        self.invalid.extend(Rejected(prefix + r.record, r.reason) for r in other.invalid)


def _loads(body: str | bytes) -> Any:
    try:
        return json.loads(body)
    except RecursionError:
        raise MalformedEvent("JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedEvent(f"not JSON: {exc}") from None


def _text(value: Any, what: str, optional: bool = True) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise InvalidRecord(f"{what} is {type(value).__name__}, not a string")
    return value


def _version(value: Any) -> str | None:
    # Unversioned buckets say nothing, "" or the literal "null".
    value = _text(value, "versionId")
    return None if value in (None, "", "null") else value


def _etag(value: Any) -> str | None:
    return (_text(value, "eTag") or "").strip('"') or None


def _size(value: Any) -> int | None:
    # AWS and MinIO send a number, Ceph RGW a string of digits.
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 19:
        size = int(value)
    else:
        raise InvalidRecord(f"size {str(value)[:40]!r} is not a whole number of bytes")
    if not 0 <= size <= MAX_SIZE:
        raise InvalidRecord(f"size {size} is out of range")
    return size


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidRecord(f"{what} is {type(value).__name__}, not an object")
    return value


def parse(
    body: str | bytes | dict[str, Any],
    raw_key_sources: Collection[str] = RAW_KEY_SOURCES,
    _depth: int = 0,
) -> Parsed:
    """Every upload event in ``body``; raises ``MalformedEvent`` for bodies of no known shape."""
    if _depth > MAX_WRAPPING:
        raise MalformedEvent("notifications wrapped too deeply")
    data = _loads(body) if isinstance(body, (str, bytes)) else body
    if not isinstance(data, dict):
        raise MalformedEvent(f"expected a JSON object, got {type(data).__name__}")
    if data.get("Event") == "s3:TestEvent":
        return Parsed(ignored=["s3:TestEvent"])
    if data.get("Type") in ("Notification", "SubscriptionConfirmation", "UnsubscribeConfirmation"):
        return _sns(data, raw_key_sources, _depth)
    if "detail-type" in data and "detail" in data:
        return _eventbridge(data)
    if isinstance(data.get("Records"), list):
        return _records(data["Records"], raw_key_sources, _depth)
    raise MalformedEvent("no Records, SNS envelope or EventBridge detail in the body")


def _sns(data: dict[str, Any], raw_key_sources: Collection[str], depth: int) -> Parsed:
    if data["Type"] != "Notification":
        return Parsed(ignored=[f"SNS {data['Type']}"])
    message = data.get("Message")
    if not isinstance(message, str):
        raise MalformedEvent("SNS notification without a Message string")
    return parse(message, raw_key_sources, depth + 1)


def _eventbridge(data: dict[str, Any]) -> Parsed:
    if data.get("source") != "aws.s3" or data.get("detail-type") != "Object Created":
        what = f"{str(data.get('source'))[:64]} {str(data.get('detail-type'))[:64]}"
        return Parsed(ignored=[f"EventBridge {what}"])
    try:
        detail = _object(data["detail"], "detail")
        obj = _object(detail.get("object"), "detail.object")
        event = ObjectEvent(
            bucket=_text(_object(detail.get("bucket"), "detail.bucket").get("name"), "bucket name", False),
            key=_text(obj.get("key"), "key", False),
            version_id=_version(obj.get("version-id")),
            etag=_etag(obj.get("etag") if obj.get("etag") is not None else obj.get("eTag")),
            size=_size(obj.get("size")),
            event_name="ObjectCreated:" + str(detail.get("reason", ""))[:64],
        )
        event.to_item()
    except InvalidRecord as exc:
        return Parsed(invalid=[Rejected("detail", str(exc))])
    return Parsed(events=[event])


def _records(records: list[Any], raw_key_sources: Collection[str], depth: int) -> Parsed:
    out = Parsed()
    for i, record in enumerate(records):
        where = f"Records[{i}]"
        try:
            record = _object(record, "the record")
            source = record.get("eventSource") or record.get("EventSource")
            if source == "aws:sqs":  # Lambda triggered by SQS: each body is a notification
                body = _text(record.get("body"), "the SQS body", False)
                out.extend(parse(body, raw_key_sources, depth + 1), f"{where}.body.")
            elif source == "aws:sns":  # Lambda triggered by SNS
                sns = _object(record.get("Sns"), "Sns")
                message = _text(sns.get("Message"), "Sns.Message", False)
                out.extend(parse(message, raw_key_sources, depth + 1), f"{where}.Sns.Message.")
            else:
                out.extend(_s3_record(record, raw_key_sources))
        except (InvalidRecord, MalformedEvent) as exc:
            out.invalid.append(Rejected(where, str(exc)))
    return out


def _decode_key(key: str, source: Any, raw_key_sources: Collection[str]) -> str:
    if source in raw_key_sources:
        return key
    try:
        return unquote_plus(key, errors="strict")
    except UnicodeDecodeError:
        raise InvalidRecord("key is not valid URL-encoded UTF-8") from None


def _s3_record(record: dict[str, Any], raw_key_sources: Collection[str]) -> Parsed:
    name = _text(record.get("eventName"), "eventName") or ""
    # AWS says "ObjectCreated:Put", MinIO "s3:ObjectCreated:Put".
    kind, _, action = name.removeprefix("s3:").partition(":")
    if kind != "ObjectCreated":
        return Parsed(ignored=[name[:128] or "record without eventName"])
    if action in METADATA_ONLY:
        return Parsed(ignored=[f"{name} (a metadata change, not an upload)"])
    s3 = _object(record.get("s3"), "s3")
    obj = _object(s3.get("object"), "s3.object")
    source = record.get("eventSource")
    event = ObjectEvent(
        bucket=_text(_object(s3.get("bucket"), "s3.bucket").get("name"), "bucket name", False),
        key=_decode_key(_text(obj.get("key"), "key", False), source, raw_key_sources),
        version_id=_version(obj.get("versionId")),
        etag=_etag(obj.get("eTag") if obj.get("eTag") is not None else obj.get("etag")),
        size=_size(obj.get("size")),
        event_name=name,
    )
    event.to_item()
    return Parsed(events=[event])
