"""Near-duplicate reuse for the score cache (``cache.near_duplicate_bits``, off by default):
an image whose PDQ is within a few bits of a cached image's, judged under the same policy,
detectors and decode settings, may reuse that image's detector scores.

Off by default because a near-duplicate is not the same image: a small overlay (a caption,
a sticker over what matters) moves PDQ by a few bits while changing what the detectors would
see, and PDQ collisions can be crafted (published attacks put a chosen image within a few
bits of another). Reusing scores across them would let an attacker get an unsafe image
judged by the scores of a safe one. Turn it on only where uploads are known to be mostly
re-encodes and resizes of each other, with a small threshold (at most 8 bits here; PDQ's
own match threshold is 31). Flat images (PDQ quality < 50) are never reused.

The index: a PDQ is cut into 9 chunks of 7 hex digits (28 bits; the last hex digit belongs
to none). Two hashes at most 8 bits apart agree on one of the 9 chunks, so a lookup reads
the 9 buckets of its chunks, nothing more, and compares the full hashes it finds: exact for
any threshold ≤ 8, and at a few thousand cached images each bucket holds about one hash.
In Redis every bucket is a set, keyed by the cache context (policy version, detectors,
decode settings) and chunk; one script adds an image and drops the oldest beyond
``cache.max_entries`` or older than ``cache.ttl_s`` (from their buckets too), so the index
is bounded like the cache it points into.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Protocol

from modgate import keys
from modgate.settings import CacheSettings

log = logging.getLogger(__name__)

CHUNKS = 9
CHUNK_DIGITS = 7
MAX_BITS = 8  # the chunking above is exact up to here
MIN_QUALITY = 50


def buckets(pdq: str) -> list[str]:
    """The 9 chunk values of a PDQ (64 lowercase hex digits), each prefixed by its chunk."""
    return [f"{j}:{pdq[j * CHUNK_DIGITS : (j + 1) * CHUNK_DIGITS]}" for j in range(CHUNKS)]


def distance(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()


class NearIndex(Protocol):
    def find(self, context: str, pdq: str, quality: int, max_bits: int) -> tuple[str, int] | None: ...

    def add(self, context: str, pdq: str, quality: int, entry: str) -> None: ...


def _nearest(pdq: str, candidates: list[tuple[str, str]], max_bits: int) -> tuple[str, int] | None:
    """(entry, distance) of the nearest candidate within ``max_bits`` (ties: the first)."""
    best: tuple[str, int] | None = None
    for other, entry in candidates:
        d = distance(pdq, other)
        if d <= max_bits and (best is None or d < best[1]):
            best = (entry, d)
    return best


def _usable(pdq: str | None, quality: int | None, max_bits: int = 0) -> bool:
    return bool(pdq) and quality is not None and quality >= MIN_QUALITY and 0 <= max_bits <= MAX_BITS


class MemoryNearIndex:
    """In-process index for ``modgate scan``: bounded by ``max_entries``, oldest out first."""

    def __init__(self, settings: CacheSettings) -> None:
        self.settings = settings
        self._order: collections.OrderedDict[tuple[str, str], tuple[float, str]] = collections.OrderedDict()
        self._buckets: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
        self._lock = threading.Lock()

    def find(self, context: str, pdq: str, quality: int, max_bits: int) -> tuple[str, int] | None:
        if not _usable(pdq, quality, max_bits):
            return None
        now = time.monotonic()
        with self._lock:
            seen = {h for b in buckets(pdq) for h in self._buckets.get((context, b), ())}
            candidates = [
                (h, self._order[(context, h)][1])
                for h in sorted(seen)
                if now - self._order[(context, h)][0] <= self.settings.ttl_s
            ]
        return _nearest(pdq, candidates, max_bits)

    def add(self, context: str, pdq: str, quality: int, entry: str) -> None:
        if not _usable(pdq, quality):
            return
        with self._lock:
            self._order[(context, pdq)] = (time.monotonic(), entry)
            self._order.move_to_end((context, pdq))
            for b in buckets(pdq):
                self._buckets[(context, b)].add(pdq)
            while len(self._order) > self.settings.max_entries:
                (ctx, old), _ = self._order.popitem(last=False)
                for b in buckets(old):
                    members = self._buckets.get((ctx, b))
                    if members is not None:
                        members.discard(old)
                        if not members:
                            del self._buckets[(ctx, b)]


# KEYS: index zset, prefix of bucket keys. ARGV: context, pdq, entry key, now, ttl, max
# entries, chunks, chunk digits. The index holds "context pdq entry" members scored by time;
# each bucket set holds "pdq entry". Dropping a member drops it from its buckets.
_ADD = """
local function bucket_keys(ctx, pdq)
  local out = {}
  local n = tonumber(ARGV[8])
  for j = 0, tonumber(ARGV[7]) - 1 do
    out[#out + 1] = KEYS[2] .. ctx .. ':' .. j .. ':' .. string.sub(pdq, j * n + 1, (j + 1) * n)
  end
  return out
end
local function drop(members)
  for _, m in ipairs(members) do
    local ctx, pdq, entry = string.match(m, '^(%S+) (%S+) (%S+)$')
    if ctx then
      for _, k in ipairs(bucket_keys(ctx, pdq)) do redis.call('SREM', k, pdq .. ' ' .. entry) end
    end
    redis.call('ZREM', KEYS[1], m)
  end
end
local now, ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
drop(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - ttl))
local member = ARGV[1] .. ' ' .. ARGV[2] .. ' ' .. ARGV[3]
redis.call('ZADD', KEYS[1], now, member)
for _, k in ipairs(bucket_keys(ARGV[1], ARGV[2])) do
  redis.call('SADD', k, ARGV[2] .. ' ' .. ARGV[3])
  redis.call('EXPIRE', k, ttl)
end
local over = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[6])
if over > 0 then drop(redis.call('ZRANGE', KEYS[1], 0, over - 1)) end
return 1
"""


class RedisNearIndex:
    """The fleet's index, beside the Redis score cache. A Redis error is no reuse, never a
    failed image."""

    def __init__(self, redis: Any, settings: CacheSettings) -> None:
        self.redis = redis
        self.settings = settings
        self._add = redis.register_script(_ADD)

    def find(self, context: str, pdq: str, quality: int, max_bits: int) -> tuple[str, int] | None:
        if not _usable(pdq, quality, max_bits):
            return None
        try:
            pipe = self.redis.pipeline(transaction=False)
            for b in buckets(pdq):
                pipe.smembers(keys.near_duplicate_bucket(context, b))
            replies = pipe.execute()
        except Exception as exc:
            log.warning("near-duplicate lookup failed: %s", exc)
            return None
        candidates: set[tuple[str, str]] = set()
        for members in replies:
            for raw in members:
                text = raw.decode() if isinstance(raw, bytes) else str(raw)
                other, _, entry = text.partition(" ")
                if len(other) == 64 and entry:  # anything else was not written by add()
                    try:
                        int(other, 16)
                    except ValueError:
                        continue
                    candidates.add((other, entry))
        return _nearest(pdq, sorted(candidates), max_bits)

    def add(self, context: str, pdq: str, quality: int, entry: str) -> None:
        if not _usable(pdq, quality):
            return
        s = self.settings
        try:
            self._add(
                keys=[keys.NEAR_DUPLICATE_INDEX, keys.NEAR_DUPLICATE_PREFIX],
                args=[context, pdq, entry, time.time(), s.ttl_s, s.max_entries, CHUNKS, CHUNK_DIGITS],
            )
        except Exception as exc:
            log.warning("near-duplicate index write failed: %s", exc)
