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
import uuid
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from fnmatch import fnmatchcase
from typing import Any

from pydantic import ValidationError

from modgate import keys
from modgate.contract import MODERATE_QUEUE, Item, ModerateMessage, validate_message
from modgate.errors import ErrorCode
from modgate.policy import Policy, with_error_decision
from modgate.settings import Settings
from modgate.verdict import ErrorInfo, Source, Verdict, error_verdict
from worker.delivery import actions
from worker.delivery.actions import ObjectActions, TransientActionError
from worker.delivery.publisher import TRANSIENT, Published, ResultPublisher
from worker.delivery.webhooks import (
    MAX_HOP_S,
    Delivery,
    Dispatcher,
    Outcome,
    Schedule,
    event_id,
    strip_userinfo,
    unsigned_warning,
)
from worker.ingest.fetch import is_transient
from worker.observe import metrics
from worker.observe.health import Health

log = logging.getLogger(__name__)


# KEYS: the verdict's meta record. ARGV: the new record (JSON), ttl. Keeps the URLs an
# earlier copy recorded (and its tenant, if this copy has none), so the record names every
# endpoint the entry's events went to.
_MERGE_META = """
local new = cjson.decode(ARGV[1])
local old = redis.call('GET', KEYS[1])
if old then
  local ok, prev = pcall(cjson.decode, old)
  if ok and type(prev) == 'table' and type(prev.urls) == 'table' then
    local seen = {}
    for _, url in ipairs(new.urls) do seen[url] = true end
    for _, url in ipairs(prev.urls) do
      if type(url) == 'string' and not seen[url] then table.insert(new.urls, url); seen[url] = true end
    end
    if new.tenant == cjson.null and type(prev.tenant) == 'string' then new.tenant = prev.tenant end
  end
end
local out = cjson.encode(new)
if #new.urls == 0 then out = string.gsub(out, '"urls":{}', '"urls":[]') end  -- cjson: {} for empty
redis.call('SET', KEYS[1], out, 'EX', ARGV[2])
"""


class Requeue(Exception):
    """The message goes back to the queue: the worker is draining, it timed out (transient),
    or an S3 action failed transiently."""


# Error codes whose messages quote S3/boto or Python exception text (endpoints, request
# ids, internal paths). The stream entry, and so every webhook, carries this generic text
# instead; the full text goes to the worker log.
_GENERIC = {
    ErrorCode.NOT_FOUND: "the object does not exist, or changed since it was listed",
    ErrorCode.ACCESS_DENIED: "the worker was denied access to the object",
    ErrorCode.FETCH_FAILED: "the object could not be fetched from storage",
    ErrorCode.INTERNAL: "internal error while moderating the image",
}

# Releases the reconciler lock only while it still holds our token: a round that outlived
# the lock's expiry must not delete the lock another worker has taken since.
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
# Messages at the consuming end of the queue the reconciler reads to learn what is still queued.
_PEEK = 100


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
        self._meta_script = self.redis.register_script(_MERGE_META)
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
        self._banks: Any = None

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Load the models (if this process moderates), then report ready."""
        from worker.observe import health

        metrics.watch_queues(self.redis, self.queues, self.settings.results.stream)
        if self.settings.worker.metrics_port:
            self._http = health.serve(
                self.health, self.settings.worker.metrics_host, self.settings.worker.metrics_port
            )
        self.health.start()
        from modgate.contract import WEBHOOK_QUEUE

        unsigned = unsigned_warning(self.settings.webhook)
        if WEBHOOK_QUEUE in self.queues and unsigned is not None:
            log.warning(unsigned)
        if MODERATE_QUEUE in self.queues:
            if self.settings.worker.buckets is None:
                log.warning(
                    "worker.buckets is unset: objects of any bucket these credentials can read are "
                    "moderated; set MODGATE_WORKER__BUCKETS to the buckets this worker is for"
                )
            self.pipeline = self._build_pipeline()
            if self._resend is not None:
                threading.Thread(target=self._reconcile_loop, name="modgate-reconcile", daemon=True).start()
            self.health.live_checks.append(self.pipeline.alive)
            self.health.detectors = sorted(getattr(self.pipeline, "_loaded_ids", []))
            self.health.devices = health.detector_devices(self.pipeline)
        self.health.ready = True
        self.health.beat()
        log.info(
            "worker ready",
            extra={"queues": ",".join(self.queues), "detectors": ",".join(self.health.detectors)},
        )

    def _build_pipeline(self) -> Any:
        if self._pipeline_factory is not None:
            return self._pipeline_factory(self.settings)
        from worker.judge.score_cache import RedisScoreCache
        from worker.pipeline import Pipeline

        cache = RedisScoreCache(self.redis, self.settings.cache) if self.settings.cache.enabled else None
        banks = None
        if self.settings.banks.sync:
            from worker.judge.banks import BankSync

            # Loaded before the first message: a worker does not judge without its banks.
            self._banks = banks = BankSync(self.redis, self.settings)
            banks.start()
            self.health.banks = banks.health
        return Pipeline(self.settings, on_batch=metrics.BATCH_SIZE.observe, cache=cache, banks=banks)

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
        if self._banks is not None:
            self._banks.stop()

    # -- modgate.moderate ---------------------------------------------------------------

    def moderate(self, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, int]:
        # Seen alive: the reconciler leaves a running message alone.
        self.redis.zadd(keys.OUTBOX, {task_id: time.time()}, xx=True)
        try:
            counts = self._moderate(task_id, args, kwargs)
        except Requeue:
            # Back at the producers' end of the queue: seen now, so the reconciler knows it
            # is queued behind everything sent before this moment.
            self.redis.zadd(keys.OUTBOX, {task_id: time.time()}, xx=True)
            raise
        pipe = self.redis.pipeline(transaction=True)
        pipe.zrem(keys.OUTBOX, task_id)
        pipe.hdel(keys.OUTBOX_PAYLOADS, task_id)
        pipe.delete(keys.message_retries(task_id))
        pipe.execute()
        return counts

    def _moderate(self, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, int]:
        from worker.pipeline import Cancel, Cancelled  # numpy & co.: not in webhook-only processes

        message, rejected = self._parse(task_id, args, kwargs)
        counts = {"items": 0, "published": 0, "duplicates": 0, "rejected": len(rejected)}
        self._publish([with_error_decision(v, self.settings.policy) for v in rejected], None, counts)
        if message is None:
            metrics.MESSAGES.labels("invalid").inc()
            return counts
        policy = self._policy(message.policy)
        counts["items"] = len(message.items)
        # Until its turn to enter the pipeline comes, a message may wait admission_wait_s;
        # its timeout starts when it enters. Under a backlog, a message that had already
        # used up its time waiting would otherwise be admitted only to be cancelled half-way,
        # and every message after it likewise: the work done would go to waste.
        cancel = Cancel(time.monotonic() + self.settings.worker.admission_wait_s)
        refused, waiting = self._screen(message, policy)
        failed_actions = self._finish(refused, message, policy, counts)
        # future -> (source, when it entered the pipeline)
        pending: dict[Future[Verdict], tuple[Source, float]] = {}
        unfetched: list[Verdict] = []  # fetch_failed that may pass: held back, see below
        try:
            with self.pipeline.admission(cancel) as admitted:
                if admitted:
                    cancel.deadline = time.monotonic() + self.settings.worker.message_timeout_s
                while admitted and waiting and not self._draining(cancel):
                    future = self.pipeline.submit(waiting[0], message.request_id, policy, cancel=cancel)
                    if future.done() and isinstance(future.exception(), Cancelled):
                        break  # timed out while waiting for room in the pipeline
                    pending[future] = (waiting.pop(0), time.monotonic())
            while pending or waiting:
                done = [f for f in pending if f.done() and f.exception() is None]
                for future in done:
                    pending.pop(future)
                results = [f.result() for f in done]
                unfetched += [v for v in results if _transient_fetch(v)]
                results = [v for v in results if not _transient_fetch(v)]
                failed_actions += self._finish(results, message, policy, counts)
                if not pending and not waiting:
                    break
                if self._draining(cancel):
                    metrics.MESSAGES.labels("requeued").inc()
                    left = len(pending) + len(waiting)
                    raise Requeue(f"{left} of {counts['items']} items unfinished at the drain deadline")
                if cancel.cancelled:
                    failed_actions += self._timed_out(task_id, message, policy, pending, waiting, counts)
                    break
                wait(list(pending), timeout=0.25, return_when=FIRST_COMPLETED)
        finally:
            cancel.set()  # whatever is still in the pipeline for this message stops at its next stage
        if unfetched:
            failed_actions += self._fetch_failed(task_id, message, policy, unfetched, counts)
        if failed_actions:
            self._actions_failed(task_id, failed_actions)
        metrics.MESSAGES.labels("done").inc()
        log.info("message done", extra={"task_id": task_id, "request_id": message.request_id, **counts})
        return counts

    def _draining(self, cancel: Any) -> bool:
        if self._drain_deadline is not None and time.monotonic() >= self._drain_deadline:
            cancel.set()
            return True
        return False

    def _screen(self, message: ModerateMessage, policy: Policy) -> tuple[list[Verdict], list[Source]]:
        """Items this worker refuses (error verdicts) and the sources it moderates. Applied
        here, whatever produced the message (producers, backfill, a direct ``send_task``)."""
        allowed = self.settings.worker.buckets
        refused: list[Verdict] = []
        sources: list[Source] = []
        for item in message.items:
            source = _source(item)
            if any(part in (".", "..") for part in item.key.split("/")):
                # S3 keeps them literally, but URL normalisation (clients, proxies, other
                # stores) and quarantine prefixes would resolve them to another object.
                code, why = ErrorCode.INVALID_KEY, "the key has a '.' or '..' path segment"
            elif allowed is not None and not any(fnmatchcase(item.bucket, p) for p in allowed):
                code, why = ErrorCode.BUCKET_NOT_ALLOWED, f"bucket {item.bucket!r} is not in worker.buckets"
            else:
                sources.append(source)
                continue
            refused.append(error_verdict(source, policy.version, code, why, request_id=message.request_id))
        return refused, sources

    def _timed_out(
        self,
        task_id: str,
        message: ModerateMessage,
        policy: Policy,
        pending: dict[Future[Verdict], tuple[Source, float]],
        waiting: list[Source],
        counts: dict[str, int],
    ) -> list[tuple[Verdict, str]]:
        """Items unfinished at the message timeout: the message goes back to the queue (a
        timeout is transient), or, once its retries are spent, they get ``timeout`` verdicts
        (returns their failed actions, as ``_finish``: recorded, not lost)."""
        timeout = self.settings.worker.message_timeout_s
        unfinished = [source for source, _ in pending.values()] + waiting
        now = time.monotonic()
        # Items that spent most of the time waiting for room in the pipeline (a backlog) are
        # late, not stuck: that costs no retry. One that was in the pipeline for at least
        # half the timeout does.
        if not any(now - entered >= timeout / 2 for _, entered in pending.values()):
            metrics.MESSAGES.labels("requeued_backlog").inc()
            raise Requeue(f"{len(unfinished)} of {counts['items']} items waited for room past the timeout")
        retries = self._requeue_while_retries_last(
            task_id,
            "timeout",
            f"{len(unfinished)} of {counts['items']} items unfinished at the message timeout",
            {"request_id": message.request_id},
        )
        late = [
            error_verdict(
                source,
                policy.version,
                ErrorCode.TIMEOUT,
                f"not finished within worker.message_timeout_s={timeout} in {retries} deliveries",
                request_id=message.request_id,
            )
            for source in unfinished
        ]
        pending.clear()
        waiting.clear()
        return self._finish(late, message, policy, counts)

    def _fetch_failed(
        self,
        task_id: str,
        message: ModerateMessage,
        policy: Policy,
        unfetched: list[Verdict],
        counts: dict[str, int],
    ) -> list[tuple[Verdict, str]]:
        """Items whose fetch failed transiently (S3 throttling, 5xx, connection errors, out
        of time waiting for S3 to recover) after ``s3.max_attempts``: like a timeout, the
        message goes back to the queue, sharing the ``timeout_retries`` count; once that is
        spent they get their ``fetch_failed`` verdicts. Returns failed actions, as ``_finish``."""
        self._requeue_while_retries_last(
            task_id,
            "fetch",
            f"{len(unfetched)} of {counts['items']} items could not be fetched yet",
            {"request_id": message.request_id, "uri": unfetched[0].source.uri},
        )
        return self._finish(unfetched, message, policy, counts)

    def _requeue_while_retries_last(self, task_id: str, why: str, what: str, context: dict[str, Any]) -> int:
        """Count one more re-queue of this task (timeouts, transient fetch and S3 action
        errors share ``worker.timeout_retries``) and raise ``Requeue`` while the count allows
        it; past it, return the count so the caller records the failure instead."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.incr(keys.message_retries(task_id))
        pipe.expire(keys.message_retries(task_id), 24 * 3600)
        retries = int(pipe.execute()[0])
        allowed = self.settings.worker.timeout_retries
        if retries <= allowed:
            metrics.MESSAGES.labels(f"requeued_{why}").inc()
            log.warning(
                "%s; re-queued (retry %d of %d)",
                what,
                retries,
                allowed,
                extra={"task_id": task_id, **context},
            )
            raise Requeue(what)
        return retries

    def _actions_failed(self, task_id: str, failed: list[tuple[Verdict, str]]) -> None:
        """S3 actions that failed transiently: the message goes back to the queue, and its
        redelivery (a duplicate, verdicts already on the stream) runs them again, up to
        ``timeout_retries`` times; then the error is recorded as their outcome."""
        self._requeue_while_retries_last(
            task_id, "actions", f"S3 actions failed for {len(failed)} verdict(s): {failed[0][1]}", {}
        )
        for verdict, error in failed:
            actions.record_outcome(
                self.redis, actions.outcome_id(verdict), {"error": error}, self.settings.results.dedup_ttl_s
            )

    def _reconcile_loop(self) -> None:
        interval = min(30.0, self.settings.worker.visibility_timeout_s / 2)
        while not self._stop.wait(interval):
            try:
                self.reconcile()
            except Exception as exc:  # Redis down: try again next round
                log.warning("outbox reconcile failed: %s", exc)

    def reconcile(self, now: float | None = None) -> list[str]:
        """Re-send messages that went quiet and are no longer queued (see ``keys.OUTBOX``),
        and webhook deliveries lost in transit (``Dispatcher.resend_lost``).

        One worker at a time does this (a lock, released only by its holder). Re-sending is
        safe: verdicts are published once, whatever number of copies of a message runs."""
        token = uuid.uuid4().hex
        if not self.redis.set(keys.RECONCILE_LOCK, token, nx=True, ex=60):
            return []
        try:
            lost = self.dispatcher.resend_lost(self.settings.worker.visibility_timeout_s + 60, now)
            if lost:
                log.warning("re-sent %d webhook deliveries lost in transit", len(lost))
            cutoff = (now if now is not None else time.time()) - self.settings.worker.reconcile_after_s
            if self.redis.llen(MODERATE_QUEUE) > 0:
                queued = self._oldest_queued()
                if queued is None:
                    return []  # cannot tell what is still waiting its turn
                cutoff = min(cutoff, queued)
            resent = []
            for raw in self.redis.zrangebyscore(keys.OUTBOX, "-inf", f"({cutoff}", start=0, num=500):
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
            self.redis.eval(_RELEASE, 1, keys.RECONCILE_LOCK, token)

    def _oldest_queued(self) -> float | None:
        """The earliest outbox time among the next messages to be consumed, or None when
        none of them is in the outbox. Messages enter the queue at one end (sent, re-queued:
        their outbox time is then) and leave at the other, so whatever was last seen before
        this time is no longer queued: it is running, or lost."""
        ids = []
        for raw in self.redis.lrange(MODERATE_QUEUE, -_PEEK, -1):
            try:
                ids.append(str(json.loads(raw)["headers"]["id"]))
            except (ValueError, KeyError, TypeError):
                continue  # not a Celery message we can read
        scores = [s for s in self.redis.zmscore(keys.OUTBOX, ids) if s is not None] if ids else []
        return min(scores) if scores else None

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
    ) -> list[tuple[Verdict, str]]:
        """Publish, then act: S3 actions run only once the verdict is durable on the stream,
        so a crash in between can never turn an unsafe verdict into a ``not_found`` one.
        Returns the verdicts whose actions failed transiently, with the error."""
        if not verdicts:
            return []
        # Error verdicts follow the policy's `errors` rules: their decision (review or
        # none) and their actions (tag by default), so no error leaves an object looking judged.
        verdicts = [with_error_decision(self._redact(v), policy) for v in verdicts]
        wanted = policy.actions
        acting = wanted.tag or wanted.quarantine is not None
        for verdict in verdicts:
            if acting or verdict.error is not None:
                verdict.policy_actions = actions.plan(verdict, wanted, self._error_rule(verdict, policy))
        self._publish(verdicts, message, counts)
        failed: list[tuple[Verdict, str]] = []
        for verdict in verdicts:
            if verdict.policy_actions:
                error = self._act(verdict, wanted, self._error_rule(verdict, policy))
                if error is not None:
                    failed.append((verdict, error))
        return failed

    @staticmethod
    def _error_rule(verdict: Verdict, policy: Policy) -> Any:
        return policy.error_rule(verdict.error.code) if verdict.error is not None else None

    def _act(self, verdict: Verdict, wanted: Any, rule: Any = None) -> str | None:
        """Run the actions unless an earlier copy of the message recorded their outcome
        (duplicates run them too: a crash may have fallen between publishing and acting).
        An error verdict's outcome is kept apart from an ok one's (``actions.outcome_id``),
        and as briefly as its verdict's dedup marker when the error may pass."""
        key = actions.outcome_id(verdict)
        if actions.outcome(self.redis, key) is not None:
            return None
        transient = verdict.error is not None and verdict.error.code in TRANSIENT
        ttl = self.settings.results.transient_dedup_ttl_s if transient else self.settings.results.dedup_ttl_s
        try:
            done = self._object_actions().apply(verdict, wanted, rule)
        except TransientActionError as exc:
            log.warning(
                "S3 action on %s failed, will retry: %s",
                verdict.source.uri,
                exc,
                extra={"verdict_id": verdict.id, "uri": verdict.source.uri},
            )
            metrics.ACTIONS.labels("retry", "error").inc()
            return str(exc)
        actions.record_outcome(self.redis, key, done or {}, ttl)
        for action in ("tagged", "quarantined_to", "error", "skipped"):
            if done and action in done:
                metrics.ACTIONS.labels(action, "error" if action == "error" else "ok").inc()
        return None

    def _redact(self, verdict: Verdict) -> Verdict:
        """Error verdicts carry their code and a generic message; the original text (S3/boto
        or exception detail) stays in this worker's log."""
        error = verdict.error
        if error is None or error.code not in _GENERIC or error.message == _GENERIC[error.code]:
            return verdict
        log.info(
            "error detail for %s: %s",
            verdict.id,
            error.message,
            extra={"verdict_id": verdict.id, "uri": verdict.source.uri, "code": error.code.value},
        )
        verdict.error = ErrorInfo(code=error.code, message=_GENERIC[error.code])
        return verdict

    def _publish(
        self, verdicts: list[Verdict], message: ModerateMessage | None, counts: dict[str, int]
    ) -> None:
        if not verdicts:
            return
        tenant = message.tenant if message is not None else None
        results = self.publisher.publish_many(verdicts)
        urls = self._deliverable_urls(message, results)
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
        self._enqueue_webhooks(results, urls, tenant)

    def _enqueue_webhooks(self, results: list[Published], urls: list[str], tenant: str | None) -> None:
        """One delivery per stream entry and URL. Sent for duplicates too: if a crash fell
        between the stream entry and this send, the redelivered message must still produce
        the webhook; copies are no-ops (the dispatcher's done marker), and a duplicate sends
        the entry as stored, so every copy carries the same event id and body."""
        from kombu.exceptions import OperationalError

        self._record_meta(results, urls, tenant)
        try:
            for published in results:
                vid, body = published.verdict_id, published.body
                if body is None:  # trimmed from the stream long ago: its webhooks went then
                    log.warning("stream entry %s of verdict %s is gone", published.entry_id, vid)
                    continue
                event = event_id(vid, published.entry_id)
                for url in urls:
                    self.dispatcher.send(Delivery.new(event, url, body, tenant, verdict_id=vid), 0.0)
        except OperationalError as exc:
            # The webhook queue is unreachable: acking now would lose these webhooks, so the
            # message goes back to the queue (its verdicts are published; a redelivery
            # only re-sends their stored entries).
            raise Requeue(f"could not queue webhooks: {exc}") from exc

    def _record_meta(self, results: list[Published], urls: list[str], tenant: str | None) -> None:
        """What the review console needs and the verdict does not carry (``keys.verdict_meta``):
        the tenant, so a ``verdict.reviewed`` event is signed with the tenant's secrets, and the
        URLs this entry's events went to. Written before the webhooks are queued and again by
        every copy of the message, so a verdict with webhooks always has its record; a copy
        with other URLs (the key re-sent with another callback) adds them."""
        pipe = self.redis.pipeline(transaction=False)
        for published in results:
            record = json.dumps({"tenant": tenant, "urls": urls, "entry_id": published.entry_id})
            self._meta_script(
                keys=[keys.verdict_meta(published.verdict_id)],
                args=[record, self.settings.results.meta_ttl_s],
                client=pipe,
            )
        pipe.execute()

    def _webhook_urls(self, message: ModerateMessage | None) -> list[str]:
        """The message's callback and the global webhook URL, credentials stripped."""
        urls = []
        if message is not None and message.callback_url is not None:
            urls.append(strip_userinfo(str(message.callback_url)))
        if self.settings.webhook.url and strip_userinfo(self.settings.webhook.url) not in urls:
            urls.append(strip_userinfo(self.settings.webhook.url))
        return urls

    def _deliverable_urls(self, message: ModerateMessage | None, results: list[Published]) -> list[str]:
        """The webhook URLs the policy accepts. A refused one is dead-lettered once per
        message (without bodies: the verdicts are on the stream), not once per verdict."""
        urls = []
        for url in self._webhook_urls(message):
            reason = self.dispatcher.policy_refusal(url)
            if reason is None:
                urls.append(url)
                continue
            scope = message.model_dump_json() if message is not None else results[0].verdict_id
            self.dispatcher.refuse_once(
                url,
                reason,
                scope,
                len(results),
                request_id=message.request_id if message is not None else None,
                tenant=message.tenant if message is not None else None,
                first_event_id=event_id(results[0].verdict_id, results[0].entry_id),
            )
            metrics.WEBHOOKS.labels("refused").inc(len(results))
        return urls

    def _object_actions(self) -> ObjectActions:
        if self._actions is None:
            self._actions = ObjectActions(self.pipeline.fetcher.client)
        return self._actions

    # -- modgate.deliver_webhook ------------------------------------------------------------

    def deliver(self, payload: Any) -> Outcome:
        """One webhook task. Every way out either finishes the delivery (delivered, dead
        letter, or a following copy on the queue) or raises ``Requeue`` so the task message
        goes back to the queue: a Redis or broker error never acks a delivery away."""
        import redis as redis_lib
        from kombu.exceptions import OperationalError

        try:
            try:
                delivery = Delivery.model_validate(payload)
            except ValidationError as exc:
                log.error("invalid webhook delivery: %s", _reason(exc), extra={"code": "invalid_message"})
                self.dispatcher.dead_letter_raw(payload, f"invalid delivery: {_reason(exc)}")
                metrics.WEBHOOKS.labels("invalid").inc()
                return "dead"
            try:
                outcome = self.dispatcher.deliver(delivery)
            except (redis_lib.RedisError, OperationalError):
                raise
            except Exception as exc:  # a bug: dead-letter it rather than drop it
                log.exception("webhook %s failed internally", delivery.delivery_id)
                outcome = self.dispatcher.dead_letter(delivery, f"internal: {type(exc).__name__}: {exc}")
        except (redis_lib.RedisError, OperationalError) as exc:
            metrics.WEBHOOKS.labels("requeued").inc()
            raise Requeue(f"redis or broker error while delivering a webhook: {exc}") from exc
        metrics.WEBHOOKS.labels(outcome).inc()
        log.info(
            "webhook %s",
            outcome,
            extra={
                "event_id": delivery.event_id,
                "verdict_id": delivery.verdict_id,
                "delivery_id": delivery.delivery_id,
                "attempt": delivery.attempt,
            },
        )
        return outcome


def _transient_fetch(verdict: Verdict) -> bool:
    error = verdict.error
    return error is not None and is_transient(error.code, error.message)


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
