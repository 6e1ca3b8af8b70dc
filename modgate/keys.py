"""Every Redis key modgate writes, in one place (queues are named in ``modgate.contract``).

Deployments and probes rely on these names; change them only with a migration note.
"""

from __future__ import annotations

PREFIX = "modgate"

# Results stream: one entry per verdict, field ``verdict`` holds the verdict JSON.
VERDICT_STREAM = f"{PREFIX}:verdicts"
# Webhook deliveries that ran out of attempts; ``modgate webhooks replay`` re-sends them.
WEBHOOK_DEAD_STREAM = f"{PREFIX}:webhooks:dead"


# Messages producers have sent and no worker has finished: task id -> last seen (zset) and
# task id -> payload (hash). Workers remove an entry when the message is done; the
# reconciler re-sends entries that went quiet (kombu can lose a message a worker popped
# but had not yet recorded as unacknowledged when it was killed).
OUTBOX = f"{PREFIX}:outbox"
OUTBOX_PAYLOADS = f"{PREFIX}:outbox:payloads"
RECONCILE_LOCK = f"{PREFIX}:outbox:reconcile-lock"


# Webhook deliveries on the queue and not yet settled: delivery id -> when it is due (zset)
# and delivery id -> its latest payload (hash). The dispatcher removes an entry once the
# delivery is delivered or dead-lettered; the reconciler re-sends entries quiet long past
# their due time (kombu can lose a task popped just before Redis or the worker died).
WEBHOOK_PENDING = f"{PREFIX}:webhooks:pending"
WEBHOOK_PENDING_PAYLOADS = f"{PREFIX}:webhooks:pending:payloads"


def published_marker(verdict_id: str) -> str:
    """Set (NX, with a TTL) in the same script that adds the verdict to the stream."""
    return f"{PREFIX}:published:{verdict_id}"


def delivered_marker(delivery_id: str) -> str:
    """Set once a webhook delivery got a 2xx (or was dead-lettered): later copies are no-ops."""
    return f"{PREFIX}:webhook:done:{delivery_id}"


def delivery_lease(delivery_id: str) -> str:
    """Held while one process is POSTing a delivery, so two copies never POST at once."""
    return f"{PREFIX}:webhook:lease:{delivery_id}"


def retry_claim(delivery_id: str, chain: str, attempt: int, hop: int = 0) -> str:
    """Claimed by whoever schedules ``attempt`` (or one hop of its wait): duplicate copies
    of a delivery cannot fork the retry chain."""
    return f"{PREFIX}:webhook:retry:{delivery_id}:{chain}:{attempt}:{hop}"


def webhook_host_slots(authority: str) -> str:
    """Sorted set of the POSTs in flight to one ``host:port`` (token -> expiry, ms): the
    per-host concurrency cap shared by every dispatcher."""
    return f"{PREFIX}:webhook:host:{authority}"


def webhook_refused(digest: str) -> str:
    """Set when a message's callback URL was refused by policy and dead-lettered, so the
    message's other verdicts (and its redeliveries) do not add a dead letter each."""
    return f"{PREFIX}:webhook:refused:{digest}"


def health(hostname: str, pid: int | str) -> str:
    """Heartbeat of one worker process (JSON, expires unless refreshed); one key per
    process, so several workers on one host do not overwrite each other."""
    return f"{PREFIX}:health:{hostname}:{pid}"


def event_marker(fingerprint: str) -> str:
    """Set by producers after enqueueing an object event: repeated notifications within
    ``producer.dedup_ttl_s`` are enqueued once."""
    return f"{PREFIX}:event:{fingerprint}"


def message_retries(task_id: str) -> str:
    """How many times one message (by task id) went back to the queue because it timed out
    or an S3 action failed transiently; past ``worker.timeout_retries`` it is finished
    with error verdicts instead, so no message loops forever."""
    return f"{PREFIX}:message:retries:{task_id}"


def action_outcome(verdict_id: str) -> str:
    """What the policy's S3 actions did for one verdict (JSON), written after they ran;
    until it exists every copy of the message runs them again."""
    return f"{PREFIX}:actions:{verdict_id}"


# The score cache: detector scores by (bytes, policy, detectors, decode settings), with a
# sorted set of entries by insertion time that bounds their number.
SCORE_CACHE_INDEX = f"{PREFIX}:cache:index"


def score_cache(digest: str) -> str:
    """One cached entry (JSON), expiring after ``cache.ttl_s``."""
    return f"{PREFIX}:cache:{digest}"


# Near-duplicate reuse (worker/judge/near_duplicates.py, ``cache.near_duplicate_bits``): a
# sorted set of "context pdq entry" by insertion time (bounded like the cache), and per
# context and PDQ chunk a set of "pdq entry" (expiring after ``cache.ttl_s``, emptied as the
# sorted set drops its members).
NEAR_DUPLICATE_INDEX = f"{PREFIX}:cache:near-index"
NEAR_DUPLICATE_PREFIX = f"{PREFIX}:cache:near:"


def near_duplicate_bucket(context: str, bucket: str) -> str:
    return f"{NEAR_DUPLICATE_PREFIX}{context}:{bucket}"


# Hash banks (``modgate banks``; worker/judge/banks.py). The registry maps each bank's name
# to its spec (JSON); per bank, its hashes (hex -> note/quality JSON, or "") and its meta
# (``version``: the sequence number of its last change, ``count``: how many hashes it has),
# kept together by one script per change, which also appends the change to the changes
# stream that workers follow. Bounded by ``banks.max_banks``, ``banks.max_entries`` (per
# bank) and ``banks.changes_maxlen`` (stream entries, each at most 1,000 hashes).
BANKS = f"{PREFIX}:banks"
BANK_CHANGES = f"{PREFIX}:banks:changes"
BANK_SEQUENCE = f"{PREFIX}:banks:seq"


def bank_entries(name: str) -> str:
    return f"{PREFIX}:bank:{name}:entries"


def bank_meta(name: str) -> str:
    return f"{PREFIX}:bank:{name}:meta"


# What the review console needs about a verdict that the verdict itself does not carry,
# written at publish time (``results.meta_ttl_s``): its tenant, the webhook URLs its
# ``verdict.created`` events went to, and its stream entry (JSON).
def verdict_meta(verdict_id: str) -> str:
    return f"{PREFIX}:verdict:{verdict_id}:meta"


# Per-minute counts of published verdicts (a hash per minute, fields ``total``,
# ``decision:<d>``, ``status:<s>``, ``category:<c>`` for flagged categories), incremented by
# the publish script with the stream entry, so duplicates never count twice and the console's
# dashboard reads counters instead of scanning the stream. Expire after ``results.stats_ttl_s``.
def stats_minute(minute: int) -> str:
    return f"{PREFIX}:stats:{minute}"


# The review console (console/queue.py): its consumer group on VERDICT_STREAM, the queue of
# verdicts waiting for a person (verdict id -> max category score; bounded by
# ``console.queue_maxlen``), each item's JSON (expires after ``console.queue_ttl_s``), and
# the lease a reviewer holds on an open item (SET NX PX ``console.lease_s``).
CONSOLE_GROUP = "console"
REVIEW_QUEUE = f"{PREFIX}:review:queue"


def review_item(verdict_id: str) -> str:
    return f"{PREFIX}:review:item:{verdict_id}"


def review_lease(verdict_id: str) -> str:
    return f"{PREFIX}:review:lease:{verdict_id}"


def review_skipped(reviewer: str) -> str:
    """Items one reviewer skipped (verdict id -> when), hidden from them for a while (zset)."""
    return f"{PREFIX}:review:skipped:{reviewer}"


# Review decisions (modgate/review.py): every decision recorded, in order (fields ``verdict_id``,
# ``decision`` (the ReviewDecision JSON), ``uri``; bounded by ``review.reviews_maxlen``), and per
# verdict the decision that won (SET NX with the decision JSON, ``review.decided_ttl_s``),
# written together by one script so the first decision wins and the second reviewer sees it.
REVIEWS = f"{PREFIX}:reviews"


def review_decided(verdict_id: str) -> str:
    return f"{PREFIX}:review:decided:{verdict_id}"


# Decisions recorded but not yet carried out (verdict id -> when recorded; zset): the decide
# script adds, completion removes, and the console finishes what a dead process left here.
REVIEW_INCOMPLETE = f"{PREFIX}:review:incomplete"
