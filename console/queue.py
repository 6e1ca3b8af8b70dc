"""The review queue: verdicts waiting for a person, filled from the verdict stream.

A consumer group (``keys.CONSOLE_GROUP``) on the verdict stream hands each entry to one
console process once; an entry whose decision needs a person (``review``, and ``unsafe``
with ``console.queue_unsafe``) becomes an item (``keys.review_item``: JSON with the verdict,
expiring after ``console.queue_ttl_s``) in a sorted set by the verdict's highest category
score, bounded by ``console.queue_maxlen`` (the lowest scores leave first). Only the latest
entry per verdict id counts: a newer entry replaces the item, or removes it when its
decision needs no person. Entries are acknowledged after they are queued; entries another
console read and never acknowledged (it died in between) are claimed after a minute.

A reviewer who opens an item holds a lease on it (SET NX PX ``console.lease_s``); the
queue page and "next" skip items leased by someone else, and items a reviewer skipped.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from redis.exceptions import ResponseError

from modgate import keys
from modgate.settings import ConsoleSettings

log = logging.getLogger(__name__)

# Entries read by a console that never acknowledged them are taken over after this long.
CLAIM_IDLE_MS = 60_000
# Each console process reads as its own consumer (host:pid); consumers of processes gone
# for a day, with nothing pending, are removed when a console starts.
STALE_CONSUMER_MS = 24 * 3600 * 1000
# Queue members looked at per page build, whatever the filters: a page stays bounded work.
SCAN_CAP = 2_000
SKIP_HIDE_S = 3_600
SKIPPED_MAX = 1_000

_ITEM_PREFIX = keys.review_item("")

# KEYS: queue, item. ARGV: verdict id, entry id, score, item JSON ("" = the entry needs no
# person), ttl, maxlen, item key prefix. Returns 1 queued, 2 removed, 0 unchanged (an
# entry not newer than the item's, or a decided item).
_UPSERT = """
local function after(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  if not bms then return true end
  ams, aseq, bms, bseq = tonumber(ams), tonumber(aseq), tonumber(bms), tonumber(bseq)
  return ams > bms or (ams == bms and aseq > bseq)
end
local old = redis.call('GET', KEYS[2])
if old then
  local item = cjson.decode(old)
  if item['decided'] or not after(ARGV[2], item['entry_id']) then return 0 end
end
if ARGV[4] == '' then
  if not old then return 0 end
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('SET', KEYS[2], cjson.encode({entry_id = ARGV[2], gone = true}), 'EX', ARGV[5])
  return 2
end
redis.call('SET', KEYS[2], ARGV[4], 'EX', ARGV[5])
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
local over = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[6])
if over > 0 then
  local popped = redis.call('ZPOPMIN', KEYS[1], over)
  for i = 1, #popped, 2 do redis.call('DEL', ARGV[7] .. popped[i]) end
end
return 1
"""

# KEYS: item, queue, lease. ARGV: verdict id, the decision record (JSON), ttl. The item
# becomes a tombstone that remembers who decided what; no older entry can queue it again.
_DECIDED = """
local old = redis.call('GET', KEYS[1])
local entry = ''
if old then entry = cjson.decode(old)['entry_id'] or '' end
local record = cjson.decode(ARGV[2])
record['entry_id'] = entry
record['gone'] = true
record['decided'] = true
redis.call('SET', KEYS[1], cjson.encode(record), 'EX', ARGV[3])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
return 1
"""

# KEYS: lease. ARGV: reviewer, ms. Returns "" when the caller holds the lease now, else the holder.
_LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return holder end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return ''
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entry_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def max_score(verdict: dict[str, Any]) -> float:
    scores = [c.get("score") for c in (verdict.get("categories") or {}).values() if isinstance(c, dict)]
    return max((float(s) for s in scores if isinstance(s, int | float)), default=0.0)


def _parse_time(value: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


@dataclass
class Filters:
    category: str | None = None
    tenant: str | None = None
    # Only items whose verdict is at most / at least this many hours old.
    max_age_h: float | None = None
    min_age_h: float | None = None

    def matches(self, item: dict[str, Any], tenant: str | None, now: float) -> bool:
        if self.category and self.category not in item.get("categories", {}):
            return False
        if self.tenant and tenant != self.tenant:
            return False
        created = item.get("created_ts")
        if self.max_age_h is not None and (created is None or now - created > self.max_age_h * 3600):
            return False
        return not (self.min_age_h is not None and (created is None or now - created < self.min_age_h * 3600))


@dataclass
class QueueItem:
    verdict_id: str
    entry_id: str
    score: float
    decision: str | None
    primary_category: str | None
    categories: dict[str, float]
    created_at: str | None
    created_ts: float | None
    verdict: dict[str, Any]
    tenant: str | None = None
    leased_by: str | None = None
    urls: list[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> QueueItem:
        return cls(
            verdict_id=data["verdict_id"],
            entry_id=data["entry_id"],
            score=float(data.get("score") or 0.0),
            decision=data.get("decision"),
            primary_category=data.get("primary_category"),
            categories=dict(data.get("categories") or {}),
            created_at=data.get("created_at"),
            created_ts=data.get("created_ts"),
            verdict=data.get("verdict") or {},
        )


def item_json(verdict: dict[str, Any], entry_id: str) -> dict[str, Any]:
    """What the queue keeps per item: the verdict and what the pages sort and filter by."""
    categories = {
        name: float(c.get("score") or 0.0)
        for name, c in (verdict.get("categories") or {}).items()
        if isinstance(c, dict) and (c.get("flagged") or c.get("review"))
    }
    return {
        "verdict_id": verdict["id"],
        "entry_id": entry_id,
        "score": max_score(verdict),
        "decision": verdict.get("decision"),
        "primary_category": verdict.get("primary_category"),
        "categories": categories,
        "created_at": verdict.get("created_at"),
        "created_ts": _parse_time(verdict.get("created_at")),
        "verdict": verdict,
    }


class ReviewQueue:
    def __init__(self, redis: Any, settings: ConsoleSettings, stream: str = keys.VERDICT_STREAM) -> None:
        self.redis = redis
        self.settings = settings
        self.stream = stream
        self.consumer = f"{socket.gethostname()}:{os.getpid()}"
        self._upsert = redis.register_script(_UPSERT)
        self._decided = redis.register_script(_DECIDED)
        self._lease = redis.register_script(_LEASE)
        self._release = redis.register_script(_RELEASE)
        self._group_ready = False

    # -- filling -------------------------------------------------------------------------

    def wanted(self, decision: str | None) -> bool:
        return decision == "review" or (self.settings.queue_unsafe and decision == "unsafe")

    def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            # From the start of the stream: verdicts published before the console first ran
            # enter the queue too (the queue bound keeps that bounded).
            self.redis.xgroup_create(self.stream, keys.CONSOLE_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        for consumer in self.redis.xinfo_consumers(self.stream, keys.CONSOLE_GROUP):
            name = _text(consumer["name"])
            if name != self.consumer and not consumer["pending"] and consumer["idle"] > STALE_CONSUMER_MS:
                self.redis.xgroup_delconsumer(self.stream, keys.CONSOLE_GROUP, name)
        self._group_ready = True

    def pump(self, limit: int | None = None) -> int:
        """Read at most ``limit`` new entries (plus as many abandoned ones), queue what needs a
        person, acknowledge them; returns how many entries were read."""
        limit = limit or self.settings.read_batch
        self._ensure_group()
        try:
            claimed = self.redis.xautoclaim(
                self.stream, keys.CONSOLE_GROUP, self.consumer, CLAIM_IDLE_MS, start_id="0-0", count=limit
            )[1]
            read = self.redis.xreadgroup(keys.CONSOLE_GROUP, self.consumer, {self.stream: ">"}, count=limit)
        except ResponseError as exc:
            if "NOGROUP" in str(exc):  # the stream was deleted and recreated
                self._group_ready = False
                return 0
            raise
        entries = [e for e in claimed if e and e[1]] + [e for _, batch in read for e in batch]
        if not entries:
            return 0
        latest: dict[str, tuple[str, dict[str, str]]] = {}
        for raw_id, raw_fields in entries:
            entry_id = _text(raw_id)
            fields = {_text(k): _text(v) for k, v in raw_fields.items()}
            verdict_id = fields.get("id")
            if not verdict_id:
                continue
            seen = latest.get(verdict_id)
            if seen is None or _entry_key(entry_id) > _entry_key(seen[0]):
                latest[verdict_id] = (entry_id, fields)
        pipe = self.redis.pipeline(transaction=False)
        for verdict_id, (entry_id, fields) in latest.items():
            body = ""
            score = 0.0
            if self.wanted(fields.get("decision") or None):
                try:
                    verdict = json.loads(fields["verdict"])
                except (KeyError, ValueError):
                    log.warning("stream entry %s has no readable verdict; not queued", entry_id)
                    continue
                item = item_json(verdict, entry_id)
                body, score = json.dumps(item), item["score"]
            self._upsert(
                keys=[keys.REVIEW_QUEUE, keys.review_item(verdict_id)],
                args=[
                    verdict_id,
                    entry_id,
                    score,
                    body,
                    self.settings.queue_ttl_s,
                    self.settings.queue_maxlen,
                    _ITEM_PREFIX,
                ],
                client=pipe,
            )
        pipe.execute()
        self.redis.xack(self.stream, keys.CONSOLE_GROUP, *[_text(e[0]) for e in entries])
        return len(entries)

    def drain(self, rounds: int = 10) -> int:
        """Pump until the group is caught up or ``rounds`` batches were read."""
        total = 0
        for _ in range(rounds):
            n = self.pump()
            total += n
            if n == 0:
                break
        return total

    # -- reading -------------------------------------------------------------------------

    def depth(self) -> int:
        return int(self.redis.zcard(keys.REVIEW_QUEUE))

    def raw_item(self, verdict_id: str) -> dict[str, Any] | None:
        raw = self.redis.get(keys.review_item(verdict_id))
        return json.loads(raw) if raw else None

    def item(self, verdict_id: str) -> QueueItem | None:
        data = self.raw_item(verdict_id)
        if data is None or data.get("gone"):
            return None
        item = QueueItem.from_json(data)
        meta = self._meta([verdict_id])[0]
        item.tenant, item.urls = meta.get("tenant"), list(meta.get("urls") or [])
        return item

    def _meta(self, verdict_ids: list[str]) -> list[dict[str, Any]]:
        found = []
        for raw in self.redis.mget([keys.verdict_meta(v) for v in verdict_ids]) if verdict_ids else []:
            try:
                found.append(json.loads(raw) if raw else {})
            except ValueError:
                found.append({})
        return found

    def skipped(self, reviewer: str) -> set[str]:
        since = time.time() - SKIP_HIDE_S
        return {_text(m) for m in self.redis.zrangebyscore(keys.review_skipped(reviewer), since, "+inf")}

    def page(self, reviewer: str, filters: Filters, limit: int = 50) -> list[QueueItem]:
        """Items for ``reviewer``, highest score first: not leased by another reviewer, not
        skipped by this one, matching ``filters``. Looks at most ``SCAN_CAP`` members."""
        skipped = self.skipped(reviewer)
        now = time.time()
        found: list[QueueItem] = []
        chunk = 200
        for start in range(0, SCAN_CAP, chunk):
            members = [_text(m) for m in self.redis.zrevrange(keys.REVIEW_QUEUE, start, start + chunk - 1)]
            if not members:
                break
            pipe = self.redis.pipeline(transaction=False)
            pipe.mget([keys.review_item(m) for m in members])
            pipe.mget([keys.review_lease(m) for m in members])
            raw_items, leases = pipe.execute()
            metas = self._meta(members)
            dangling = []
            for member, raw, lease, meta in zip(members, raw_items, leases, metas, strict=True):
                if raw is None:
                    dangling.append(member)  # its item expired: the member goes too
                    continue
                data = json.loads(raw)
                holder = _text(lease) if lease is not None else None
                if data.get("gone") or member in skipped or (holder and holder != reviewer):
                    continue
                if not filters.matches(data, meta.get("tenant"), now):
                    continue
                item = QueueItem.from_json(data)
                item.tenant, item.urls, item.leased_by = (
                    meta.get("tenant"),
                    list(meta.get("urls") or []),
                    holder,
                )
                found.append(item)
                if len(found) >= limit:
                    break
            if dangling:
                self.redis.zrem(keys.REVIEW_QUEUE, *dangling)
            if len(found) >= limit or len(members) < chunk:
                break
        return found

    # -- reviewing -----------------------------------------------------------------------

    def lease(self, verdict_id: str, reviewer: str) -> str | None:
        """Take or refresh the lease; None when ``reviewer`` holds it now, else its holder."""
        holder = _text(
            self._lease(keys=[keys.review_lease(verdict_id)], args=[reviewer, self.settings.lease_s * 1000])
        )
        return holder or None

    def release(self, verdict_id: str, reviewer: str) -> None:
        self._release(keys=[keys.review_lease(verdict_id)], args=[reviewer])

    def skip(self, verdict_id: str, reviewer: str) -> None:
        key = keys.review_skipped(reviewer)
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(key, {verdict_id: time.time()})
        pipe.zremrangebyscore(key, "-inf", time.time() - SKIP_HIDE_S)
        pipe.zremrangebyrank(key, 0, -SKIPPED_MAX - 1)
        pipe.expire(key, SKIP_HIDE_S)
        pipe.execute()
        self.release(verdict_id, reviewer)

    def mark_decided(self, verdict_id: str, record: dict[str, Any]) -> None:
        """The item leaves the queue and remembers ``record`` (reviewer, decision, category, at)."""
        self._decided(
            keys=[keys.review_item(verdict_id), keys.REVIEW_QUEUE, keys.review_lease(verdict_id)],
            args=[verdict_id, json.dumps(record), self.settings.queue_ttl_s],
        )
