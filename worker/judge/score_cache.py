"""The score cache: uploads repeat (re-shares, memes, the same file under another key), and
the same bytes judged under the same policy, detectors and decode settings give the same
detector scores. A repeat reuses the first run's scores (and its PDQ hashes) instead of
decoding and running the ensemble again; the verdict is judged afresh from them, names the
first verdict in ``cached_from``, and still gets its own stream entry and webhooks.

Only scores are cached, never bank matches or decisions: banks change without a policy
version, so every verdict matches the banks as they stand. Near duplicates (PDQ within a
few bits) are reused only with ``cache.near_duplicate_bits`` set (off by default: a small
overlay or a crafted collision keeps the PDQ and changes what the detectors would see;
worker/judge/near_duplicates.py).

In the worker the cache lives in Redis (``modgate:cache:*``, shared by the fleet, each
entry expiring after ``cache.ttl_s``, the oldest dropped beyond ``cache.max_entries``); for
``modgate scan`` in memory, bounded the same way.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

from modgate import keys
from modgate.settings import CacheSettings
from modgate.verdict import DetectorResult, ImageInfo
from worker.ingest.hashing import checked_pdq
from worker.judge.near_duplicates import MemoryNearIndex, NearIndex, RedisNearIndex

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachedScores:
    """What a repeat of the same bytes reuses."""

    verdict_id: str
    detectors: dict[str, DetectorResult]
    image: ImageInfo
    frames: int
    frame_pdqs: tuple[tuple[str, int], ...] = ()
    # The PDQ of the file as stored, where its EXIF orientation is not 1 (``ImageHashes``).
    pdq_file: tuple[str, int] | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "verdict_id": self.verdict_id,
                "detectors": {k: v.model_dump(mode="json") for k, v in self.detectors.items()},
                "image": self.image.model_dump(mode="json"),
                "frames": self.frames,
                "frame_pdqs": [list(p) for p in self.frame_pdqs],
                **({"pdq_file": list(self.pdq_file)} if self.pdq_file is not None else {}),
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> CachedScores:
        data = json.loads(raw)
        return cls(
            verdict_id=str(data["verdict_id"]),
            detectors={str(k): DetectorResult.model_validate(v) for k, v in data["detectors"].items()},
            image=ImageInfo.model_validate(data["image"]),
            frames=int(data["frames"]),
            # Hashes feed the banks: one that is not a hash makes the entry unreadable (a miss).
            frame_pdqs=tuple(checked_pdq(p) for p in data.get("frame_pdqs", [])),
            # Absent from entries written before it existed (and for upright images).
            pdq_file=checked_pdq(stored) if (stored := data.get("pdq_file")) is not None else None,
        )


def cache_key(sha256: str, policy_version: str, detectors: str, decode: str) -> str:
    """The digest that names one entry: the bytes, the policy version, the detectors (ids,
    models, revisions) and the decode settings and backend they saw."""
    joined = "\x00".join((sha256, policy_version, detectors, decode))
    return hashlib.sha256(joined.encode()).hexdigest()


class ScoreCache(Protocol):
    # The near-duplicate index beside it (``cache.near_duplicate_bits``), or None: off.
    near: NearIndex | None

    def get(self, key: str) -> CachedScores | None: ...

    def put(self, key: str, value: CachedScores) -> None: ...


class MemoryScoreCache:
    """In-process LRU with a TTL: ``modgate scan`` has no Redis."""

    def __init__(self, settings: CacheSettings) -> None:
        self.settings = settings
        self._entries: collections.OrderedDict[str, tuple[float, CachedScores]] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.near: NearIndex | None = (
            MemoryNearIndex(settings) if settings.near_duplicate_bits is not None else None
        )

    def get(self, key: str) -> CachedScores | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                return None
            if time.monotonic() - found[0] > self.settings.ttl_s:
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return found[1]

    def put(self, key: str, value: CachedScores) -> None:
        with self._lock:
            self._entries[key] = (time.monotonic(), value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.settings.max_entries:
                self._entries.popitem(last=False)


# KEYS: entry, index. ARGV: value, ttl, now, max entries, prefix of entry keys.
_PUT = """
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], KEYS[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[3] - ARGV[2])
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[4])
if over > 0 then
  local old = redis.call('ZRANGE', KEYS[2], 0, over - 1)
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, over - 1)
  for _, k in ipairs(old) do
    if string.sub(k, 1, string.len(ARGV[5])) == ARGV[5] then redis.call('DEL', k) end
  end
end
return 1
"""


class RedisScoreCache:
    """The fleet's cache. A Redis error is a miss (or a skipped write), never a failed image:
    the cache saves work, it is not needed for a verdict."""

    def __init__(self, redis: Any, settings: CacheSettings) -> None:
        self.redis = redis
        self.settings = settings
        self._put = redis.register_script(_PUT)
        self.near: NearIndex | None = (
            RedisNearIndex(redis, settings) if settings.near_duplicate_bits is not None else None
        )

    def get(self, key: str) -> CachedScores | None:
        try:
            raw = self.redis.get(keys.score_cache(key))
        except Exception as exc:
            log.warning("score cache read failed: %s", exc)
            return None
        if raw is None:
            return None
        try:
            return CachedScores.from_json(raw)
        except Exception as exc:  # written by hand, or by another version: a miss
            log.warning("score cache entry %s unreadable (%s): ignored", key, exc)
            return None

    def put(self, key: str, value: CachedScores) -> None:
        entry = keys.score_cache(key)
        args = [value.to_json(), self.settings.ttl_s, time.time(), self.settings.max_entries]
        try:
            self._put(keys=[entry, keys.SCORE_CACHE_INDEX], args=[*args, keys.score_cache("")])
        except Exception as exc:
            log.warning("score cache write failed: %s", exc)
