"""AWS Lambda entry point, ``producers.lambda_handler.handler``, for S3 → Lambda → Redis
deployments (and S3 → SQS/SNS/EventBridge → Lambda), sharing the event parsing of the
other producers. Settings come from the function's environment (``MODGATE_REDIS__URL``…).

Triggered by SQS, it reports records it could not enqueue as ``batchItemFailures`` (enable
"report batch item failures" on the trigger), so only those come back; any other trigger
raises, and Lambda's own retry and on-failure destination take over.
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
        from worker.settings import load_settings

        _enqueuer = Enqueuer(load_settings())
    return _enqueuer


def handler(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    enqueuer = _get_enqueuer()
    records = event.get("Records") if isinstance(event, dict) else None
    if isinstance(records, list) and records and all(r.get("eventSource") == "aws:sqs" for r in records):
        return _sqs_batch(enqueuer, records)
    parsed = parse(event)  # MalformedEvent propagates: the invocation fails visibly
    result = enqueuer.enqueue_events(parsed.events)
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
            parsed = parse(record.get("body", ""))
            enqueued += enqueuer.enqueue_events(parsed.events).enqueued
            total.extend(parsed)
        except MalformedEvent as exc:
            # Reported as failed: SQS's redrive policy moves it to the dead-letter queue.
            log.warning("malformed SQS record %s: %s", record.get("messageId"), exc)
            failures.append({"itemIdentifier": record.get("messageId")})
        except Exception as exc:
            log.error("could not enqueue SQS record %s: %s", record.get("messageId"), exc)
            failures.append({"itemIdentifier": record.get("messageId")})
    return {"batchItemFailures": failures, "enqueued": enqueued, "ignored": len(total.ignored)}
