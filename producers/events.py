"""S3 event notifications in every shape they arrive in, parsed into object events.

Shapes: S3's ``Records`` (direct to SQS or Lambda, and MinIO/Ceph webhooks), the same
wrapped in an SNS envelope, EventBridge "Object Created" events, and Lambda's own
SQS/SNS batch wrappers around any of these. Only object-created events count;
``s3:TestEvent`` and every other event are ignored, with a reason.

Keys in ``Records`` are URL-encoded by S3 (space as ``+``, the rest percent-escaped);
EventBridge carries keys as they are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus


class MalformedEvent(ValueError):
    """A body that is not any known notification shape."""


@dataclass(frozen=True)
class ObjectEvent:
    bucket: str
    key: str
    version_id: str | None = None
    etag: str | None = None
    size: int | None = None
    event_name: str = ""

    def fingerprint(self) -> str:
        return f"{self.bucket}\x00{self.key}\x00{self.version_id or self.etag or ''}"


@dataclass
class Parsed:
    events: list[ObjectEvent] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def extend(self, other: Parsed) -> None:
        self.events.extend(other.events)
        self.ignored.extend(other.ignored)


def _version(value: Any) -> str | None:
    # Unversioned buckets say nothing, "" or the literal "null".
    return None if value in (None, "", "null") else str(value)


def _loads(body: str | bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedEvent(f"not JSON: {exc}") from None


def parse(body: str | bytes | dict[str, Any]) -> Parsed:
    """Every object-created event in ``body``; raises ``MalformedEvent`` for unknown shapes."""
    data = _loads(body) if isinstance(body, (str, bytes)) else body
    if not isinstance(data, dict):
        raise MalformedEvent(f"expected a JSON object, got {type(data).__name__}")
    if data.get("Event") == "s3:TestEvent":
        return Parsed(ignored=["s3:TestEvent"])
    if data.get("Type") in ("Notification", "SubscriptionConfirmation", "UnsubscribeConfirmation"):
        return _sns(data)
    if "detail-type" in data and "detail" in data:
        return _eventbridge(data)
    if isinstance(data.get("Records"), list):
        return _records(data["Records"])
    raise MalformedEvent("no Records, SNS envelope or EventBridge detail in the body")


def _sns(data: dict[str, Any]) -> Parsed:
    if data["Type"] != "Notification":
        return Parsed(ignored=[f"SNS {data['Type']}"])
    message = data.get("Message")
    if not isinstance(message, str):
        raise MalformedEvent("SNS notification without a Message string")
    return parse(message)


def _eventbridge(data: dict[str, Any]) -> Parsed:
    if data.get("source") != "aws.s3" or data.get("detail-type") != "Object Created":
        return Parsed(ignored=[f"EventBridge {data.get('source')} {data.get('detail-type')}"])
    detail = data["detail"]
    try:
        obj = detail["object"]
        event = ObjectEvent(
            bucket=detail["bucket"]["name"],
            key=obj["key"],
            version_id=_version(obj.get("version-id")),
            etag=(obj.get("etag") or obj.get("eTag") or "").strip('"') or None,
            size=obj.get("size"),
            event_name="ObjectCreated:" + str(detail.get("reason", "")),
        )
    except (KeyError, TypeError) as exc:
        raise MalformedEvent(f"EventBridge detail lacks {exc}") from None
    return Parsed(events=[event])


def _records(records: list[Any]) -> Parsed:
    out = Parsed()
    for record in records:
        if not isinstance(record, dict):
            raise MalformedEvent("a record is not an object")
        source = record.get("eventSource") or record.get("EventSource")
        if source == "aws:sqs":  # Lambda triggered by SQS: each body is a notification
            out.extend(parse(record.get("body", "")))
        elif source == "aws:sns":  # Lambda triggered by SNS
            out.extend(parse(record.get("Sns", {}).get("Message", "")))
        else:
            out.extend(_s3_record(record))
    return out


def _s3_record(record: dict[str, Any]) -> Parsed:
    name = str(record.get("eventName", ""))
    # AWS says "ObjectCreated:Put", MinIO "s3:ObjectCreated:Put".
    if not name.removeprefix("s3:").startswith("ObjectCreated:"):
        return Parsed(ignored=[name or "record without eventName"])
    try:
        s3 = record["s3"]
        obj = s3["object"]
        size = obj.get("size")
        event = ObjectEvent(
            bucket=s3["bucket"]["name"],
            key=unquote_plus(obj["key"]),
            version_id=_version(obj.get("versionId")),
            etag=(obj.get("eTag") or obj.get("etag") or "").strip('"') or None,
            size=int(size) if size is not None else None,
            event_name=name,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise MalformedEvent(f"S3 record lacks {exc}") from None
    return Parsed(events=[event])
