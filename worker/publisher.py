"""Results stream: every verdict goes to ``modgate:verdicts`` exactly once.

A Lua script sets the verdict's published marker (NX, with a TTL) and adds the stream
entry in one atomic step, so a redelivered or duplicated message can never add a second
entry, and a crash can never leave a marker without its entry (or the reverse).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from worker import keys
from worker.errors import ErrorCode
from worker.settings import ResultsSettings
from worker.verdict import Verdict

# KEYS: marker, stream. ARGV: ttl, maxlen, verdict json, verdict id, status, decision.
_PUBLISH = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  local entry = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*',
                           'verdict', ARGV[3], 'id', ARGV[4], 'status', ARGV[5], 'decision', ARGV[6])
  redis.call('SET', KEYS[1], entry, 'EX', ARGV[1])
  return entry
end
return false
"""


# Errors that may go away on their own: their verdicts suppress duplicates only briefly,
# so re-sending the key later gets the object judged.
TRANSIENT = frozenset(
    {
        ErrorCode.FETCH_FAILED,
        ErrorCode.TIMEOUT,
        ErrorCode.INTERNAL,
        ErrorCode.DETECTOR_FAILED,
        ErrorCode.ACCESS_DENIED,
    }
)


@dataclass(frozen=True)
class Published:
    verdict_id: str
    # Stream entry id; None when the verdict was already published (a duplicate).
    entry_id: str | None

    @property
    def duplicate(self) -> bool:
        return self.entry_id is None


class ResultPublisher:
    def __init__(self, redis: Any, settings: ResultsSettings) -> None:
        self.redis = redis
        self.settings = settings
        self._script = redis.register_script(_PUBLISH)

    def publish(self, verdict: Verdict) -> Published:
        return self.publish_many([verdict])[0]

    def publish_many(self, verdicts: list[Verdict]) -> list[Published]:
        """Publish in one round trip (a pipeline of script calls); each stays atomic on its own."""
        pipe = self.redis.pipeline(transaction=False)
        for verdict in verdicts:
            transient = verdict.error is not None and verdict.error.code in TRANSIENT
            self._script(
                keys=[keys.published_marker(verdict.id), self.settings.stream],
                args=[
                    self.settings.transient_dedup_ttl_s if transient else self.settings.dedup_ttl_s,
                    self.settings.stream_maxlen,
                    verdict.model_dump_json(),
                    verdict.id,
                    verdict.status,
                    verdict.decision or "",
                ],
                client=pipe,
            )
        out = []
        for verdict, entry in zip(verdicts, pipe.execute(), strict=True):
            if isinstance(entry, bytes):
                entry = entry.decode()
            out.append(Published(verdict.id, entry or None))
        return out
