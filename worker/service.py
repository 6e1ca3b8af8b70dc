"""The queue-driven service: what one ``modgate.moderate`` or ``modgate.deliver_webhook``
message does, from arrival to acknowledgement. This is where the service is wired:
contract → pipeline → S3 actions → results stream → webhook queue → metrics and logs.

One ``Service`` per worker process holds the only copy of the models (inside its
``Pipeline``). Every message runs on its own Celery thread and only submits its items to
the shared pipeline, so many one-key messages fill one GPU batch together. A message's
task returns, and Celery acknowledges it, only after every verdict of the message is on
the stream.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Any

from pydantic import ValidationError

from worker import keys, metrics
from worker.actions import ObjectActions
from worker.contract import MODERATE_QUEUE, Item, ModerateMessage, validate_message
from worker.errors import ErrorCode
from worker.health import Health
from worker.policy import Policy
from worker.publisher import ResultPublisher
from worker.settings import Settings
from worker.verdict import Source, Verdict, error_verdict
from worker.webhooks import MAX_HOP_S, Delivery, Dispatcher, Outcome, Schedule

log = logging.getLogger(__name__)


class Requeue(Exception):
    """The worker is shutting down and this message did not finish within the drain timeout."""


def _reason(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        parts = [f"{'.'.join(str(p) for p in e['loc']) or 'payload'}: {e['msg']}" for e in exc.errors()[:10]]
        return "; ".join(parts)
    return str(exc)


class Service:
    def __init__(
        self,
        settings: Settings,
        queues: list[str],
        schedule: Schedule,
        redis: Any = None,
        pipeline_factory: Callable[[Settings], Any] | None = None,
        resend: Callable[[str, Any], None] | None = None,
    ) -> None:
        import redis as redis_lib

        self.settings = settings
        self.queues = queues
        self.redis = redis if redis is not None else redis_lib.Redis.from_url(settings.redis.url)
        self.publisher = ResultPublisher(self.redis, settings.results)
        self.dispatcher = Dispatcher(
            self.redis,
            settings.webhook,
            schedule,
            marker_ttl_s=settings.results.dedup_ttl_s,
            max_hop_s=min(MAX_HOP_S, settings.worker.visibility_timeout_s / 2),
        )
        self.health = Health(self.redis, queues, settings.worker.heartbeat_s)
        self._pipeline_factory = pipeline_factory
        self._resend = resend
        self._stop = threading.Event()
        self.pipeline: Any = None
        self._actions: ObjectActions | None = None
        self._policies: dict[str | None, Policy] = {None: settings.policy}
        self._drain_deadline: float | None = None
        self._lock = threading.Lock()
        self._http: Any = None

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Load the models (if this process moderates), then report ready."""
        from worker import health

        metrics.watch_queues(self.redis, self.queues)
        if self.settings.worker.metrics_port:
            self._http = health.serve(
                self.health, self.settings.worker.metrics_host, self.settings.worker.metrics_port
            )
        self.health.start()
        if MODERATE_QUEUE in self.queues:
            self.pipeline = self._build_pipeline()
            if self._resend is not None:
                threading.Thread(target=self._reconcile_loop, name="modgate-reconcile", daemon=True).start()
            self.health.live_checks.append(self.pipeline.alive)
            self.health.detectors = sorted(getattr(self.pipeline, "_loaded_ids", []))
        self.health.ready = True
        self.health.beat()
        log.info(
            "worker ready",
            extra={"queues": ",".join(self.queues), "detectors": ",".join(self.health.detectors)},
        )

    def _build_pipeline(self) -> Any:
        if self._pipeline_factory is not None:
            return self._pipeline_factory(self.settings)
        from worker.pipeline import Pipeline

        return Pipeline(self.settings, on_batch=metrics.BATCH_SIZE.observe)

    def begin_drain(self) -> None:
        """SIGTERM: in-flight messages get ``drain_timeout_s`` to finish, then go back to the queue."""
        self._drain_deadline = time.monotonic() + self.settings.worker.drain_timeout_s
        self.health.draining = True
        log.info("draining", extra={"drain_timeout_s": self.settings.worker.drain_timeout_s})

    def close(self) -> None:
        self._stop.set()
        self.health.stop()
        if self._http is not None:
            self._http.shutdown()
        if self.pipeline is not None:
            self.pipeline.close()

    # -- modgate.moderate ---------------------------------------------------------------

    def moderate(self, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, int]:
        # Seen alive: the reconciler leaves a running message alone.
        self.redis.zadd(keys.OUTBOX, {task_id: time.time()}, xx=True)
        counts = self._moderate(task_id, args, kwargs)
        pipe = self.redis.pipeline(transaction=True)
        pipe.zrem(keys.OUTBOX, task_id)
        pipe.hdel(keys.OUTBOX_PAYLOADS, task_id)
        pipe.execute()
        return counts

    def _moderate(self, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, int]:
        message, rejected = self._parse(task_id, args, kwargs)
        counts = {"items": 0, "published": 0, "duplicates": 0, "rejected": len(rejected)}
        self._publish(rejected, None, counts)
        if message is None:
            metrics.MESSAGES.labels("invalid").inc()
            return counts
        policy = self._policy(message.policy)
        pending: dict[Future[Verdict], Source] = {}
        for item in message.items:
            source = _source(item)
            pending[self.pipeline.submit(source, message.request_id, policy)] = source
        counts["items"] = len(pending)
        deadline = time.monotonic() + self.settings.worker.message_timeout_s
        while pending:
            done, _ = wait(list(pending), timeout=0.25, return_when=FIRST_COMPLETED)
            for future in done:
                pending.pop(future)
            self._finish([f.result() for f in done], message, policy, counts)
            now = time.monotonic()
            if pending and self._drain_deadline is not None and now >= self._drain_deadline:
                metrics.MESSAGES.labels("requeued").inc()
                raise Requeue(f"{len(pending)} of {counts['items']} items unfinished at the drain deadline")
            if pending and now >= deadline:
                timeout = self.settings.worker.message_timeout_s
                late = [
                    error_verdict(
                        source,
                        policy.version,
                        ErrorCode.TIMEOUT,
                        f"not finished within worker.message_timeout_s={timeout}",
                        request_id=message.request_id,
                    )
                    for source in pending.values()
                ]
                pending.clear()
                self._finish(late, message, policy, counts)
        metrics.MESSAGES.labels("done").inc()
        log.info("message done", extra={"task_id": task_id, "request_id": message.request_id, **counts})
        return counts

    def _reconcile_loop(self) -> None:
        interval = min(30.0, self.settings.worker.visibility_timeout_s / 2)
        while not self._stop.wait(interval):
            try:
                self.reconcile()
            except Exception as exc:  # Redis down: try again next round
                log.warning("outbox reconcile failed: %s", exc)

    def reconcile(self, now: float | None = None) -> list[str]:
        """Re-send messages that went quiet while the queue is empty (see ``keys.OUTBOX``).

        One worker at a time does this (a lock). Re-sending is safe: verdicts are published
        once, whatever number of copies of a message runs."""
        if not self.redis.set(keys.RECONCILE_LOCK, "1", nx=True, ex=60):
            return []
        try:
            if self.redis.llen(MODERATE_QUEUE) > 0:
                return []  # anything quiet may still be waiting its turn
            cutoff = (now if now is not None else time.time()) - self.settings.worker.reconcile_after_s
            resent = []
            for raw in self.redis.zrangebyscore(keys.OUTBOX, "-inf", cutoff, start=0, num=500):
                task_id = raw.decode() if isinstance(raw, bytes) else raw
                payload = self.redis.hget(keys.OUTBOX_PAYLOADS, task_id)
                if payload is None:
                    self.redis.zrem(keys.OUTBOX, task_id)
                    continue
                self.redis.zadd(keys.OUTBOX, {task_id: time.time()}, xx=True)
                self._resend(task_id, json.loads(payload))  # type: ignore[misc]
                resent.append(task_id)
            if resent:
                metrics.MESSAGES.labels("resent").inc(len(resent))
                log.warning(
                    "re-sent %d message(s) lost in transit", len(resent), extra={"task_ids": ",".join(resent)}
                )
            return resent
        finally:
            self.redis.delete(keys.RECONCILE_LOCK)

    def _policy(self, name: str | None) -> Policy:
        with self._lock:
            if name not in self._policies:
                self._policies[name] = self.settings.named_policy(name)
            return self._policies[name]

    def _parse(
        self, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[ModerateMessage | None, list[Verdict]]:
        """The message, or the error records that stand for it when it breaks the contract."""
        if len(args) == 1 and not kwargs:
            payload: Any = args[0]
        elif kwargs and not args:
            payload = kwargs
        else:
            return None, self._invalid(
                task_id, None, "expected one JSON object argument (the message payload)"
            )
        try:
            message = validate_message(payload, self.settings.worker.max_items)
        except ValueError as exc:
            return None, self._invalid(task_id, payload, _reason(exc))
        if message.policy is not None and message.policy not in self.settings.policies:
            return None, self._invalid(task_id, payload, f"unknown policy {message.policy!r}")
        return message, []

    def _invalid(self, task_id: str, payload: Any, reason: str) -> list[Verdict]:
        """One record per item we can still name (so producers can match it), else one for the message."""
        log.warning(
            "invalid message %s: %s", task_id, reason, extra={"task_id": task_id, "code": "invalid_message"}
        )
        uri = f"celery://{MODERATE_QUEUE}/{task_id}"
        items = payload.get("items") if isinstance(payload, dict) else None
        request_id = payload.get("request_id") if isinstance(payload, dict) else None
        request_id = request_id if isinstance(request_id, str) else None
        sources: list[Source] = []
        if isinstance(items, list) and 0 < len(items) <= 10 * self.settings.worker.max_items:
            for index, raw in enumerate(items):
                bucket = raw.get("bucket") if isinstance(raw, dict) else None
                key = raw.get("key") if isinstance(raw, dict) else None
                sources.append(
                    Source(
                        kind="message",
                        uri=f"{uri}#items/{index}",
                        bucket=bucket if isinstance(bucket, str) else None,
                        key=key if isinstance(key, str) else None,
                    )
                )
        else:
            sources.append(Source(kind="message", uri=uri))
        version = self.settings.policy.version
        return [
            error_verdict(s, version, ErrorCode.INVALID_MESSAGE, reason, request_id=request_id)
            for s in sources
        ]

    def _finish(
        self, verdicts: list[Verdict], message: ModerateMessage, policy: Policy, counts: dict[str, int]
    ) -> None:
        if policy.actions.tag or policy.actions.quarantine is not None:
            for verdict in verdicts:
                if verdict.status != "ok":
                    continue
                verdict.actions = self._object_actions().apply(verdict, policy.actions)
                for action in ("tagged", "quarantined_to", "error"):
                    if verdict.actions and action in verdict.actions:
                        metrics.ACTIONS.labels(action, "error" if action == "error" else "ok").inc()
        self._publish(verdicts, message, counts)

    def _publish(
        self, verdicts: list[Verdict], message: ModerateMessage | None, counts: dict[str, int]
    ) -> None:
        if not verdicts:
            return
        urls = self._webhook_urls(message)
        tenant = message.tenant if message is not None else None
        results = self.publisher.publish_many(verdicts)
        metrics.record_published(verdicts, [p.duplicate for p in results])
        for verdict, published in zip(verdicts, results, strict=True):
            counts["duplicates" if published.duplicate else "published"] += 1
            # Error verdicts are always logged; ok ones only at DEBUG (the stream is their
            # record, and a line per verdict halves the queue path's throughput).
            level = logging.WARNING if verdict.status == "error" else logging.DEBUG
            if log.isEnabledFor(level):
                log.log(
                    level,
                    "verdict %s",
                    verdict.id,
                    extra={
                        "verdict_id": verdict.id,
                        "uri": verdict.source.uri,
                        "status": verdict.status,
                        "decision": verdict.decision,
                        "code": verdict.error.code.value if verdict.error else None,
                        "request_id": verdict.request_id,
                        "duplicate": published.duplicate,
                    },
                )
            # Sent for duplicates too: if a crash fell between the stream entry and this
            # send, the redelivered message must still produce the webhook. Copies are
            # no-ops (the dispatcher's done marker), so this never delivers twice.
            for url in urls:
                self.dispatcher.schedule(
                    Delivery.new(verdict.id, url, verdict.model_dump_json(), tenant), 0.0
                )

    def _webhook_urls(self, message: ModerateMessage | None) -> list[str]:
        urls = []
        if message is not None and message.callback_url is not None:
            urls.append(str(message.callback_url))
        if self.settings.webhook.url and self.settings.webhook.url not in urls:
            urls.append(self.settings.webhook.url)
        return urls

    def _object_actions(self) -> ObjectActions:
        if self._actions is None:
            self._actions = ObjectActions(self.pipeline.fetcher.client)
        return self._actions

    # -- modgate.deliver_webhook ------------------------------------------------------------

    def deliver(self, payload: Any) -> Outcome:
        try:
            delivery = Delivery.model_validate(payload)
        except ValidationError as exc:
            log.error("invalid webhook delivery dropped: %s", _reason(exc), extra={"code": "invalid_message"})
            metrics.WEBHOOKS.labels("invalid").inc()
            return "dead"
        outcome = self.dispatcher.deliver(delivery)
        metrics.WEBHOOKS.labels(outcome).inc()
        log.info(
            "webhook %s",
            outcome,
            extra={
                "verdict_id": delivery.event_id,
                "delivery_id": delivery.delivery_id,
                "attempt": delivery.attempt,
            },
        )
        return outcome


def _source(item: Item) -> Source:
    return Source(
        kind="s3",
        uri=f"s3://{item.bucket}/{item.key}",
        bucket=item.bucket,
        key=item.key,
        version_id=item.version_id,
        etag=item.etag.strip('"') if item.etag else None,
        size=item.size,
    )
