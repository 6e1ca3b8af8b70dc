"""``modgate listen sqs QUEUE_URL``: S3 event notifications from SQS onto the queue.

A message is deleted from SQS only after Redis accepted every key in it. When Redis is
down the message stays, and is made visible again after ``producer.sqs_retry_after_s``.
A malformed message, or one with records that are not valid object events (the valid
records in it are enqueued all the same), is logged and left alone, so SQS's redrive
policy moves it to the dead-letter queue after ``maxReceiveCount`` receipts. Each message
is handled on its own: one that fails in any way never keeps the others of its batch
from being deleted. Never silently dropped.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from producers.enqueuer import EVENTS, Enqueuer
from producers.events import MalformedEvent, parse

log = logging.getLogger(__name__)


@dataclass
class ListenStats:
    received: int = 0
    deleted: int = 0
    malformed: int = 0
    invalid: int = 0
    failed: int = 0
    enqueued: int = 0
    duplicates: int = 0
    ignored: int = 0


class SqsListener:
    def __init__(self, queue_url: str, enqueuer: Enqueuer, client: Any = None) -> None:
        self.queue_url = queue_url
        self.enqueuer = enqueuer
        self.settings = enqueuer.settings.producer
        if client is None:
            import boto3

            client = boto3.session.Session().client("sqs")
        self.client = client
        self.stop = threading.Event()
        self.stats = ListenStats()

    def run(self) -> ListenStats:
        log.info("listening on %s", self.queue_url)
        failures = 0
        while not self.stop.is_set():
            try:
                self.poll_once()
                failures = 0
            except Exception as exc:  # SQS unreachable or throttling: back off, keep going
                failures += 1
                wait = min(60.0, 2.0**failures)
                log.error("SQS receive failed (%s); retrying in %.0f s", exc, wait)
                self.stop.wait(wait)
        log.info("stopped", extra=self.stats.__dict__)
        return self.stats

    def poll_once(self) -> None:
        response = self.client.receive_message(
            QueueUrl=self.queue_url,
            MaxNumberOfMessages=self.settings.sqs_max_messages,
            WaitTimeSeconds=self.settings.sqs_wait_s,
            MessageSystemAttributeNames=["ApproximateReceiveCount"],
        )
        done = []
        for message in response.get("Messages", []):
            self.stats.received += 1
            try:
                if self.handle(message):
                    done.append(message)
            except Exception:  # a bug or a shape nobody foresaw: this message stays in SQS
                self.stats.failed += 1
                log.exception("SQS message %s left in the queue", message.get("MessageId"))
        for start in range(0, len(done), 10):
            batch = done[start : start + 10]
            response = self.client.delete_message_batch(
                QueueUrl=self.queue_url,
                Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(batch)],
            )
            failed = response.get("Failed", [])
            for entry in failed:  # comes back after its visibility timeout; dedup absorbs it
                log.warning("could not delete SQS message %s: %s", entry.get("Id"), entry.get("Message"))
            self.stats.deleted += len(batch) - len(failed)

    def handle(self, message: dict[str, Any]) -> bool:
        """True when the message may be deleted (its keys are on the queue, or nothing in it counts)."""
        receipts = message.get("Attributes", {}).get("ApproximateReceiveCount", "?")
        try:
            parsed = parse(message.get("Body", ""), self.settings.raw_key_sources)
        except MalformedEvent as exc:
            self.stats.malformed += 1
            EVENTS.labels("malformed").inc()
            log.warning(
                "malformed SQS message %s left for the redrive policy (receipt %s): %s",
                message.get("MessageId"),
                receipts,
                exc,
            )
            return False
        self.stats.ignored += len(parsed.ignored)
        EVENTS.labels("ignored").inc(len(parsed.ignored))
        try:
            result = self.enqueuer.enqueue_events(parsed.events)
        except Exception as exc:  # Redis down or refusing writes: keep the message
            self.stats.failed += 1
            log.error("could not enqueue SQS message %s, it stays in SQS: %s", message.get("MessageId"), exc)
            self._retry_soon(message)
            return False
        self.stats.enqueued += result.enqueued
        self.stats.duplicates += result.duplicates
        if parsed.invalid:
            # The valid records are on the queue (a redelivery finds them deduplicated); the
            # message itself goes to the dead-letter queue so the bad records are kept.
            self.stats.invalid += len(parsed.invalid)
            EVENTS.labels("invalid").inc(len(parsed.invalid))
            for rejected in parsed.invalid[:20]:
                log.warning(
                    "SQS message %s left for the redrive policy (receipt %s): invalid record %s: %s",
                    message.get("MessageId"),
                    receipts,
                    rejected.record,
                    rejected.reason,
                )
            return False
        return True

    def _retry_soon(self, message: dict[str, Any]) -> None:
        try:
            self.client.change_message_visibility(
                QueueUrl=self.queue_url,
                ReceiptHandle=message["ReceiptHandle"],
                VisibilityTimeout=self.settings.sqs_retry_after_s,
            )
        except Exception as exc:  # it comes back after the queue's own visibility timeout then
            log.warning("could not shorten the visibility of %s: %s", message.get("MessageId"), exc)
