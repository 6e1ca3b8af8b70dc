"""Review decisions: what the console records when a person decides a verdict, and what
follows from it (the ``verdict.reviewed`` webhook, the S3 action, the allow-list bank), plus
the decisions as a labels file for ``modgate eval`` / ``modgate calibrate``.

``decide`` runs, in this order:

1. One script records the decision: unless the verdict already has one
   (``keys.review_decided``), it appends it to the reviews stream (``keys.REVIEWS``, bounded)
   and stores it as the winner with a TTL. First decision wins; a second reviewer gets
   ``accepted=False`` and the winning decision.
2. On a safe decision that overturns the verdict, the object's SHA-256 goes to the exact
   allow-list bank (``review.allow_bank``), before anything is released: the release is a new
   upload, and its moderation must find the hash already there.
3. The S3 action (``review.apply_actions`` and an S3 client given): safe on a quarantined
   object releases it to its key (modgate/quarantine.py); unsafe on an object not quarantined
   moves it to the policy's quarantine, or tags it where the policy has none.
4. One ``verdict.reviewed`` delivery per webhook URL in the verdict's publish-time record
   (``keys.verdict_meta``; none when it is missing or malformed, and the result says so),
   event id ``<verdict id>:review:<reviews entry id>``, queued like every delivery
   (``modgate.envelope.queue_delivery``) for the dispatcher, which signs it with the
   record's tenant's secrets.
5. The stored decision is completed with the S3 outcome.

Steps 2-4 are idempotent (the same event id and delivery ids, a move that already happened
is recognised, a bank add of a hash already there is no change), so a decision whose
process died before step 5 is finished by the same reviewer deciding the same again
(``resumed``), or else by ``resume_incomplete``: step 1 also puts the verdict id in
``keys.REVIEW_INCOMPLETE`` (step 5 takes it out), and the console's background loop finishes
every decision left there longer than ``review.resume_after_s`` — an unsafe decision is
never left recorded but not carried out because its process died.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from modgate import keys
from modgate.banks import BankEntry, BankSpec
from modgate.detector_scores import Category
from modgate.envelope import VERDICT_REVIEWED, Delivery, queue_delivery
from modgate.policy import Policy
from modgate.settings import Settings
from modgate.verdict import Verdict

log = logging.getLogger(__name__)

# Webhook URLs taken from one publish-time record at most (it is written by the worker, but
# a record edited by hand must not turn one decision into unbounded work).
MAX_URLS = 32
LABELS_HEADER = ("uri", "label", "category")


class ReviewDecision(BaseModel):
    """One reviewer's decision on one verdict (skip is not a decision: nothing is recorded)."""

    model_config = ConfigDict(extra="forbid")

    verdict_id: str = Field(min_length=1, max_length=128)
    reviewer: str = Field(min_length=1, max_length=200)
    decision: Literal["safe", "unsafe"]
    category: Category | None = Field(
        None, description="the category of an unsafe decision (required then); null for safe"
    )
    at: float = Field(description="unix time of the decision")
    uri: str = Field("", description="the reviewed object (s3://bucket/key, or the verdict's source uri)")
    s3: dict[str, Any] | None = Field(
        None,
        description="what the decision did to the S3 object: {released_to, released_from}, "
        "{quarantined_to}, {tagged: {key: value}}, {skipped: why} or {error: why}; null when no "
        "action was applied (review.apply_actions off, no S3 client, or not yet applied)",
    )

    @model_validator(mode="after")
    def _category_fits_decision(self) -> ReviewDecision:
        if self.decision == "unsafe" and self.category is None:
            raise ValueError("an unsafe decision needs a category")
        if self.decision == "safe" and self.category is not None:
            raise ValueError("a safe decision has no category")
        return self


class ReviewedEvent(BaseModel):
    """The body of a ``verdict.reviewed`` webhook."""

    type: Literal["verdict.reviewed"] = VERDICT_REVIEWED
    review: ReviewDecision
    verdict: Verdict = Field(description="the reviewed verdict, as it was on the results stream")


@dataclass(frozen=True)
class DecideResult:
    """What ``decide`` did. ``accepted`` false: another decision was there first, and
    ``decision`` is that one (nothing else was done)."""

    accepted: bool
    decision: ReviewDecision
    entry_id: str | None = None  # the decision's reviews-stream entry
    event_id: str | None = None  # its verdict.reviewed event (None: no webhook)
    deliveries: tuple[str, ...] = ()  # delivery ids queued, one per URL
    webhook_note: str | None = None  # why no webhook was queued
    allow_listed: str | None = None  # the SHA-256 added to the allow bank
    allow_note: str | None = None  # why none was added where one was due
    resumed: bool = False  # finished a decision of this reviewer's that had not completed
    notes: list[str] = field(default_factory=list)


def review_event_id(verdict_id: str, entry_id: str) -> str:
    return f"{verdict_id}:review:{entry_id}"


def label_uri(verdict: Verdict) -> str:
    """The verdict's object as a labels file names it (``worker.quality.labels.verdict_key``)."""
    source = verdict.source
    if source.kind == "s3" and source.bucket and source.key is not None:
        return f"s3://{source.bucket}/{source.key}"
    if source.kind == "file" and source.path:
        return source.path
    return source.uri


# KEYS: decided key, reviews stream, incomplete zset. ARGV: decision json, ttl, maxlen,
# verdict id, uri, now. Returns {1, entry id} when recorded; {0, the stored record} when a
# decision was there first. Atomic as a script: the check and the writes cannot interleave
# with another decision.
_DECIDE = """
local existing = redis.call('GET', KEYS[1])
if existing then return {0, existing} end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*',
                      'verdict_id', ARGV[4], 'decision', ARGV[1], 'uri', ARGV[5])
local record = '{"entry_id":"' .. id .. '","complete":false,"decision":' .. ARGV[1] .. '}'
redis.call('SET', KEYS[1], record, 'NX', 'EX', ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[4])
return {1, id}
"""

# KEYS: decided key, incomplete zset. ARGV: entry id, the completed record, verdict id.
# Only the record of that decision.
_COMPLETE = """
local current = redis.call('GET', KEYS[1])
if not current then return 0 end
local ok, record = pcall(cjson.decode, current)
if not ok or type(record) ~= 'table' or record.entry_id ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
redis.call('ZREM', KEYS[2], ARGV[3])
return 1
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class _Record:
    entry_id: str
    complete: bool
    decision: ReviewDecision


def _parse_record(raw: Any) -> _Record:
    data = json.loads(_text(raw))
    return _Record(
        str(data["entry_id"]), bool(data.get("complete")), ReviewDecision.model_validate(data["decision"])
    )


def decided(redis: Any, verdict_id: str) -> ReviewDecision | None:
    """The decision that won for ``verdict_id``, or None while there is none."""
    raw = redis.get(keys.review_decided(verdict_id))
    return _parse_record(raw).decision if raw is not None else None


def _as_verdict(verdict: Verdict | Mapping[str, Any] | str | bytes) -> Verdict:
    if isinstance(verdict, Verdict):
        return verdict
    if isinstance(verdict, (str, bytes)):
        return Verdict.model_validate_json(verdict)
    return Verdict.model_validate(dict(verdict))


def decide(
    redis: Any,
    settings: Settings,
    verdict: Verdict | Mapping[str, Any] | str | bytes,
    reviewer: str,
    decision: Literal["safe", "unsafe"],
    category: str | None,
    *,
    s3: Any = None,
    send_task: Callable[[Delivery], None],
) -> DecideResult:
    """Record ``reviewer``'s decision on ``verdict`` (first decision wins) and carry it out:
    allow-list, S3 action, ``verdict.reviewed`` webhooks (see the module docstring).
    ``send_task`` sends one delivery's webhook task (``modgate.envelope.celery_sender``).
    Raises pydantic's ValidationError for a decision that is not one (unsafe without a
    category, a category not among the 11, safe with one)."""
    reviewed = _as_verdict(verdict)
    mine = ReviewDecision(
        verdict_id=reviewed.id,
        reviewer=reviewer,
        decision=decision,
        category=category,  # type: ignore[arg-type]  # validated against Category here
        at=time.time(),
        uri=label_uri(reviewed),
    )
    cfg = settings.review
    script = redis.register_script(_DECIDE)
    recorded, value = script(
        keys=[keys.review_decided(reviewed.id), keys.REVIEWS, keys.REVIEW_INCOMPLETE],
        args=[mine.model_dump_json(), cfg.decided_ttl_s, cfg.reviews_maxlen, reviewed.id, mine.uri, mine.at],
    )
    resumed = False
    if int(recorded):
        entry_id = _text(value)
    else:
        existing = _parse_record(value)
        same = (existing.decision.reviewer, existing.decision.decision, existing.decision.category) == (
            reviewer,
            decision,
            mine.category,
        )
        if existing.complete or not same:
            return DecideResult(accepted=False, decision=existing.decision, entry_id=existing.entry_id)
        mine, entry_id, resumed = existing.decision, existing.entry_id, True
    return _carry_out(redis, settings, reviewed, mine, entry_id, s3, send_task, resumed)


def _carry_out(
    redis: Any,
    settings: Settings,
    verdict: Verdict,
    mine: ReviewDecision,
    entry_id: str,
    s3: Any,
    send_task: Callable[[Delivery], None],
    resumed: bool,
) -> DecideResult:
    notes: list[str] = []
    allow_listed = allow_note = None
    if mine.decision == "safe" and verdict.decision != "safe":
        allow_listed, allow_note = _allow_list(redis, settings, verdict, mine)
    policy = _policy_for(settings, verdict)
    if settings.review.apply_actions and s3 is not None:
        done = _outcome_record(redis, verdict)
        mine = mine.model_copy(update={"s3": apply_action(s3, verdict, mine.decision, policy, done)})
    elif settings.review.apply_actions:
        notes.append("no S3 client: the decision was not applied to the object")
    event = review_event_id(verdict.id, entry_id)
    tenant, urls, webhook_note = read_meta(redis, verdict.id)
    delivery_ids: list[str] = []
    if urls:
        body = ReviewedEvent(review=mine, verdict=verdict).model_dump_json()
        for url in urls:
            delivery = Delivery.new(
                event, url, body, tenant, verdict_id=verdict.id, event_type=VERDICT_REVIEWED
            )
            queue_delivery(redis, delivery, send_task)
            delivery_ids.append(delivery.delivery_id)
    record = json.dumps({"entry_id": entry_id, "complete": True, "decision": mine.model_dump(mode="json")})
    redis.register_script(_COMPLETE)(
        keys=[keys.review_decided(verdict.id), keys.REVIEW_INCOMPLETE], args=[entry_id, record, verdict.id]
    )
    return DecideResult(
        accepted=True,
        decision=mine,
        entry_id=entry_id,
        event_id=event if delivery_ids else None,
        deliveries=tuple(delivery_ids),
        webhook_note=webhook_note,
        allow_listed=allow_listed,
        allow_note=allow_note,
        resumed=resumed,
        notes=notes,
    )


def resume_incomplete(
    redis: Any,
    settings: Settings,
    find_verdict: Callable[[str], Verdict | Mapping[str, Any] | None],
    *,
    s3: Any = None,
    send_task: Callable[[Delivery], None],
    now: float | None = None,
    limit: int = 100,
) -> list[DecideResult]:
    """Finish the decisions recorded more than ``review.resume_after_s`` ago whose process
    died before completing them (``keys.REVIEW_INCOMPLETE``), as their reviewer deciding
    again would. ``find_verdict`` gives a verdict by id (the console: its queue item, else
    the results stream). A decision whose verdict can no longer be found is dropped from the
    set with an error logged: nothing is left to act on. Returns what was finished."""
    cutoff = (time.time() if now is None else now) - settings.review.resume_after_s
    finished: list[DecideResult] = []
    for raw_id in redis.zrangebyscore(keys.REVIEW_INCOMPLETE, "-inf", cutoff, start=0, num=limit):
        verdict_id = _text(raw_id)
        raw = redis.get(keys.review_decided(verdict_id))
        try:
            record = _parse_record(raw) if raw is not None else None
        except (ValueError, KeyError, TypeError, ValidationError):
            record = None
        if record is None or record.complete:
            redis.zrem(keys.REVIEW_INCOMPLETE, verdict_id)
            continue
        found = find_verdict(verdict_id)
        try:
            verdict = _as_verdict(found) if found is not None else None
        except ValidationError:
            verdict = None
        if verdict is None or verdict.id != verdict_id:
            log.error(
                "review decision on %s (%s by %s) cannot be finished: the verdict is gone",
                verdict_id,
                record.decision.decision,
                record.decision.reviewer,
            )
            redis.zrem(keys.REVIEW_INCOMPLETE, verdict_id)
            continue
        log.warning("finishing the review decision on %s cut short by its process", verdict_id)
        try:
            finished.append(
                _carry_out(redis, settings, verdict, record.decision, record.entry_id, s3, send_task, True)
            )
        except Exception as exc:  # left in the set for the next round; the others go on
            log.warning("review decision on %s not finished yet: %s: %s", verdict_id, type(exc).__name__, exc)
    return finished


def read_meta(redis: Any, verdict_id: str) -> tuple[str | None, list[str], str | None]:
    """(tenant, webhook URLs, why none) from the verdict's publish-time record. A record that
    is missing or malformed gives no URLs, never an error: the decision stands without its
    webhook, and the third item says why."""
    raw = redis.get(keys.verdict_meta(verdict_id))
    if raw is None:
        return None, [], "no publish-time record for this verdict (expired after results.meta_ttl_s?)"
    try:
        record = json.loads(_text(raw))
    except (ValueError, UnicodeDecodeError):
        return None, [], "the publish-time record is not JSON"
    if not isinstance(record, dict):
        return None, [], "the publish-time record is not a JSON object"
    tenant, urls = record.get("tenant"), record.get("urls")
    if tenant is not None and not isinstance(tenant, str):
        # Signing with another tenant's secrets (or none) would be worse than not sending.
        return None, [], "the publish-time record's tenant is not a string"
    if not isinstance(urls, list):
        return tenant, [], "the publish-time record has no list of URLs"
    good = list(
        dict.fromkeys(u for u in urls if isinstance(u, str) and u.startswith(("http://", "https://")))
    )
    if not good:
        return tenant, [], "the verdict's events went to no webhook URL"
    if len(good) > MAX_URLS:
        log.warning(
            "verdict %s: %d webhook URLs in its record, only the first %d get verdict.reviewed",
            verdict_id,
            len(good),
            MAX_URLS,
        )
    return tenant, good[:MAX_URLS], None


def _policy_for(settings: Settings, verdict: Verdict) -> Policy:
    """The policy the verdict was judged under (by version; the default when none matches)."""
    if verdict.policy_version == settings.policy.version:
        return settings.policy
    for name in settings.policies:
        policy = settings.named_policy(name)
        if policy.version == verdict.policy_version:
            return policy
    return settings.policy


def _outcome_record(redis: Any, verdict: Verdict) -> dict[str, Any] | None:
    """The worker's record of what its S3 actions did (worker/delivery/actions.py writes it
    under the verdict id, with the error code for an error verdict)."""
    outcome_id = verdict.id if verdict.error is None else f"{verdict.id}:{verdict.error.code.value}"
    raw = redis.get(keys.action_outcome(outcome_id))
    if raw is None:
        return None
    try:
        record = json.loads(_text(raw))
    except (ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def apply_action(
    client: Any, verdict: Verdict, decision: str, policy: Policy, done: dict[str, Any] | None
) -> dict[str, Any]:
    """Carry a decision out on the verdict's S3 object, given what the worker's actions did
    (``done``, its outcome record): safe releases a quarantined object and re-tags one the
    worker tagged; unsafe quarantines an object not quarantined (the policy's quarantine
    location), or tags it where the policy has none. Returns what happened; an S3 failure is
    returned as ``error``, never raised (the decision stands, the object stays as it is)."""
    from modgate import quarantine

    source = verdict.source
    if source.kind != "s3" or not source.bucket or not source.key:
        return {"skipped": "not an S3 object"}
    bucket, key = source.bucket, source.key
    done = done or {}
    quarantined_to = done.get("quarantined_to") if isinstance(done.get("quarantined_to"), str) else None
    tag_key = policy.actions.tag_key
    out: dict[str, Any] = {}
    try:
        if decision == "safe":
            if quarantined_to:
                out["released_to"] = quarantine.release(client, quarantined_to, bucket, key)
                out["released_from"] = quarantined_to
            # Copied back tags and all: the worker's decision tag would still say unsafe.
            tagged = isinstance(done.get("tagged"), dict) and done["tagged"]
            if tagged and quarantine.tag(client, bucket, key, tag_key, "safe"):
                out["tagged"] = {tag_key: "safe"}
            return out or {"skipped": "the worker neither quarantined nor tagged it: nothing to undo"}
        if quarantined_to:
            return {"skipped": f"already quarantined at {quarantined_to}"}
        q = policy.actions.quarantine
        if q is not None:
            target_bucket = q.bucket or bucket
            if q.prefix and target_bucket == bucket and key.startswith(q.prefix):
                return {"skipped": "the object already lies in the quarantine location"}
            out["quarantined_to"] = quarantine.quarantine(
                client,
                bucket,
                key,
                q.prefix,
                target_bucket=q.bucket,
                version_id=source.version_id,
                etag=source.etag,
            )
            return out
        if quarantine.tag(client, bucket, key, tag_key, "unsafe"):
            return {"tagged": {tag_key: "unsafe"}}
        return {"error": "NoSuchKey: the object is not there; nothing tagged"}
    except Exception as exc:  # recorded with the decision; the reviewer sees it
        code = quarantine.error_code(exc)
        log.warning("review action on %s failed: %s", source.uri, exc)
        return {**out, "error": f"{code or type(exc).__name__}: {exc}"}


def _allow_list(
    redis: Any, settings: Settings, verdict: Verdict, mine: ReviewDecision
) -> tuple[str | None, str | None]:
    """Add the object's SHA-256 to the review allow-list bank (created on first use: kind
    sha256, action safe). Returns (the hash added, None) or (None, why not)."""
    from modgate.bank_store import BankStore, BankStoreError
    from modgate.banks import BankFormatError, normalize_hash

    sha = verdict.source.sha256
    if not sha:
        return None, "the verdict carries no SHA-256 (an error verdict?): not allow-listed"
    try:
        digest = normalize_hash("sha256", sha)
    except BankFormatError as exc:
        return None, f"not allow-listed: {exc}"
    name = settings.review.allow_bank
    store = BankStore(redis, settings.banks)
    try:
        state = store.state(name)
        if state is None:
            store.put_spec(BankSpec(name=name, kind="sha256", action="safe"))
        elif state.spec is not None and (state.spec.kind != "sha256" or state.spec.action != "safe"):
            return None, f"bank {name!r} is not a sha256 bank of action safe: not allow-listed"
        note = f"review {mine.verdict_id} by {mine.reviewer}"[:200]
        store.add(name, [BankEntry(digest, note)])
    except BankStoreError as exc:
        return None, f"not allow-listed: {exc}"
    return digest, None


def export_labels(redis: Any, since: float | None = None, until: float | None = None) -> Iterator[str]:
    """The review decisions as a labels file in ``modgate eval``'s format (CSV: ``uri,label,
    category``; one line per string, newline included), the latest decision per verdict among
    those taken in [since, until] (unix times). Reads the reviews stream in pages; memory is
    bounded by the stream's length (``review.reviews_maxlen``)."""
    start = str(int(since * 1000)) if since is not None else "-"
    # An entry id is taken just after its decision's time: a few seconds of slack, then `at` decides.
    end = str(int((until + 5) * 1000)) if until is not None else "+"
    latest: dict[str, tuple[str, str, str]] = {}
    while True:
        page = redis.xrange(keys.REVIEWS, start, end, count=1000)
        for entry_id, fields in page:
            row = _label_row({_text(k): _text(v) for k, v in fields.items()}, since, until)
            if row is not None:
                verdict_id, values = row
                latest.pop(verdict_id, None)  # keep the order of each verdict's latest decision
                latest[verdict_id] = values
            start = "(" + _text(entry_id)
        if len(page) < 1000:
            break
    yield _csv_line(LABELS_HEADER)
    for values in latest.values():
        yield _csv_line(values)


def _label_row(
    fields: dict[str, str], since: float | None, until: float | None
) -> tuple[str, tuple[str, str, str]] | None:
    try:
        decision = ReviewDecision.model_validate_json(fields.get("decision", ""))
    except ValidationError:
        log.warning("reviews stream: an entry that is not a decision was skipped")
        return None
    if (since is not None and decision.at < since) or (until is not None and decision.at > until):
        return None
    uri = decision.uri or fields.get("uri", "")
    if not uri:
        return None
    return decision.verdict_id, (uri, decision.decision, decision.category or "")


def _csv_line(values: tuple[str, ...]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
    return buffer.getvalue()
