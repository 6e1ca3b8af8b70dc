"""Results stream: every verdict goes to ``modgate:verdicts`` exactly once.

A Lua script sets the verdict's published marker (NX, with a TTL) and adds the stream
entry in one atomic step, so a redelivered or duplicated message can never add a second
entry, and a crash can never leave a marker without its entry (or the reverse). The
marker holds the entry id: a duplicate gets the entry it duplicates back (id and stored
verdict JSON), so its webhooks carry what the stream says, not a fresh computation.

The same script counts the new entry in its minute's counters (``keys.stats_minute``), so the
console's dashboard reads counts that duplicates never inflate, without scanning the stream.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from modgate import keys
from modgate.errors import ErrorCode
from modgate.settings import ResultsSettings
from modgate.verdict import Verdict

# KEYS: marker, stream, minute counters. ARGV: ttl, maxlen, verdict json, verdict id, status,
# decision, counters ttl, then the counter fields to increment.
# Returns {entry id, 1} for a new entry; {entry id, 0, stored verdict json} for a duplicate
# ({entry id, 0} if the stream has trimmed that entry since).
_PUBLISH = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  local entry = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*',
                           'verdict', ARGV[3], 'id', ARGV[4], 'status', ARGV[5], 'decision', ARGV[6])
  redis.call('SET', KEYS[1], entry, 'EX', ARGV[1])
  for i = 8, #ARGV do redis.call('HINCRBY', KEYS[3], ARGV[i], 1) end
  redis.call('EXPIRE', KEYS[3], ARGV[7])
  return {entry, 1}
end
local entry = redis.call('GET', KEYS[1])
local found = redis.call('XRANGE', KEYS[2], entry, entry)
if #found == 1 then
  local fields = found[1][2]
  for i = 1, #fields, 2 do
    if fields[i] == 'verdict' then return {entry, 0, fields[i + 1]} end
  end
end
return {entry, 0}
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
    # The stream entry: the one just added, or for a duplicate the one already there.
    entry_id: str
    duplicate: bool
    # The verdict JSON as stored in that entry; None only if the stream trimmed it away.
    body: str | None


def counter_fields(verdict: Verdict) -> list[str]:
    """The per-minute counters one new verdict increments: ``total``, its status, its
    decision and each category it flagged."""
    fields = ["total", f"status:{verdict.status}"]
    if verdict.decision:
        fields.append(f"decision:{verdict.decision}")
    fields += [f"category:{name}" for name, result in sorted(verdict.categories.items()) if result.flagged]
    return fields


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


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
        minute = keys.stats_minute(int(time.time()) // 60)
        bodies = []
        for verdict in verdicts:
            transient = verdict.error is not None and verdict.error.code in TRANSIENT
            body = verdict.model_dump_json()
            bodies.append(body)
            self._script(
                keys=[keys.published_marker(verdict.id), self.settings.stream, minute],
                args=[
                    self.settings.transient_dedup_ttl_s if transient else self.settings.dedup_ttl_s,
                    self.settings.stream_maxlen,
                    body,
                    verdict.id,
                    verdict.status,
                    verdict.decision or "",
                    self.settings.stats_ttl_s,
                    *counter_fields(verdict),
                ],
                client=pipe,
            )
        out = []
        for verdict, body, reply in zip(verdicts, bodies, pipe.execute(), strict=True):
            entry, new, *stored = reply
            if new:
                out.append(Published(verdict.id, _text(entry), False, body))
            else:
                out.append(Published(verdict.id, _text(entry), True, _text(stored[0]) if stored else None))
        return out
