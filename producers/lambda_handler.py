"""AWS Lambda entry point, ``producers.lambda_handler.handler``, for S3 → Lambda → Redis
deployments (and S3 → SQS/SNS/EventBridge → Lambda), sharing the event parsing of the
other producers. Settings come from the function's environment (``MODGATE_REDIS__URL``…).

Triggered by SQS, it reports records it could not enqueue, and records whose notification
holds invalid object events, as ``batchItemFailures`` (enable "report batch item failures"
on the trigger), so only those come back and end in the redrive policy's dead-letter
queue; the valid events of such a record are enqueued all the same (deduplicated when it
comes back). Any other trigger enqueues what is valid, then raises if anything was not,
and Lambda's own retry and on-failure destination take over.
"""

from __future__ import annotations

import logging
from typing import Any

from producers.enqueuer import Enqueuer
from producers.events import MalformedEvent, Parsed, parse

log = logging.getLogger(__name__)

_enqueuer: Enqueuer | None = None


def _get_enqueuer() -> Enqueuer:
    # Built once per Lambda container and reused by warm invocations.
    global _enqueuer
    if _enqueuer is None:
        from modgate.settings import load_settings

        _enqueuer = Enqueuer(load_settings())
    return _enqueuer


def handler(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    enqueuer = _get_enqueuer()
    sources = enqueuer.producer.raw_key_sources
    records = event.get("Records") if isinstance(event, dict) else None
    if (
        isinstance(records, list)
        and records
        and all(isinstance(r, dict) and r.get("eventSource") == "aws:sqs" for r in records)
    ):
        return _sqs_batch(enqueuer, records)
    parsed = parse(event, sources)  # MalformedEvent propagates: the invocation fails visibly
    result = enqueuer.enqueue_events(parsed.events)
    if parsed.invalid:
        # The valid events are on the queue; failing sends the whole event to the function's
        # on-failure destination, where the invalid records are kept.
        for rejected in parsed.invalid[:20]:
            log.warning("invalid record %s: %s", rejected.record, rejected.reason)
        raise MalformedEvent(f"{len(parsed.invalid)} invalid record(s), first: {parsed.invalid[0].reason}")
    return {
        "enqueued": result.enqueued,
        "duplicates": result.duplicates,
        "refused": result.refused,
        "ignored": len(parsed.ignored),
    }


def _sqs_batch(enqueuer: Enqueuer, records: list[dict[str, Any]]) -> dict[str, Any]:
    failures = []
    total = Parsed()
    enqueued = 0
    for record in records:
        try:
            body = record.get("body")
            parsed = parse(body if isinstance(body, str) else "", enqueuer.producer.raw_key_sources)
            enqueued += enqueuer.enqueue_events(parsed.events).enqueued
            total.extend(parsed)
            if parsed.invalid:
                log.warning(
                    "SQS record %s has invalid records, reported as failed: %s",
                    record.get("messageId"),
                    parsed.invalid[0].reason,
                )
                failures.append({"itemIdentifier": record.get("messageId")})
        except MalformedEvent as exc:
            # Reported as failed: SQS's redrive policy moves it to the dead-letter queue.
            log.warning("malformed SQS record %s: %s", record.get("messageId"), exc)
            failures.append({"itemIdentifier": record.get("messageId")})
        except Exception as exc:
            log.error("could not enqueue SQS record %s: %s", record.get("messageId"), exc)
            failures.append({"itemIdentifier": record.get("messageId")})
    return {"batchItemFailures": failures, "enqueued": enqueued, "ignored": len(total.ignored)}
