"""The hash banks in Redis (:class:`BankStore`): what ``modgate banks``, the review console and
every worker's sync read and write, with no numpy so the light deployables can use it.

Redis holds, per bank, its spec (in the registry ``keys.BANKS``), its hashes and a meta
record (``version``, ``count``); one Lua script per change writes them together and appends
the change (bank, op, version, hashes) to the changes stream ``keys.BANK_CHANGES``, which
workers follow (worker/judge/banks.py, ``BankSync``). Versions come from one counter, so they
never repeat, not even for a bank dropped and created again. Adding and removing a hash are
idempotent.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from modgate import keys
from modgate.banks import BankEntry, BankSpec
from modgate.settings import BankSettings

# Hashes per script call and per stream entry.
CHUNK = 1000


class BankStoreError(Exception):
    """A bank operation that cannot be done: no such bank or a kind that cannot change
    (``usage``: the command was wrong), a bound reached or a bank that does not validate."""

    def __init__(self, message: str, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


# KEYS: registry, entries, meta, stream, sequence.
# ARGV: name, stream maxlen, max entries, then hash, value pairs.
# Returns {version, added} ({0, 0} when nothing was new: no version, no stream entry).
_ADD = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return redis.error_reply('NOBANK') end
local new, seen = {}, {}
for i = 4, #ARGV, 2 do
  -- A hash given twice in one call is one new hash: the meta's count must equal HLEN.
  if not seen[ARGV[i]] and redis.call('HEXISTS', KEYS[2], ARGV[i]) == 0 then new[#new + 1] = ARGV[i] end
  seen[ARGV[i]] = true
end
local count = tonumber(redis.call('HGET', KEYS[3], 'count') or '0')
if count + #new > tonumber(ARGV[3]) then return redis.error_reply('FULL ' .. count) end
-- A hash already there keeps its note unless this one brings another.
for i = 4, #ARGV, 2 do
  if ARGV[i + 1] ~= '' or redis.call('HEXISTS', KEYS[2], ARGV[i]) == 0 then
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  end
end
if #new == 0 then return {0, 0} end
local version = redis.call('INCR', KEYS[5])
redis.call('HSET', KEYS[3], 'version', version, 'count', count + #new)
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[2], '*', 'bank', ARGV[1], 'op', 'add',
           'version', version, 'hashes', table.concat(new, ' '))
return {version, #new}
"""

# KEYS: registry, entries, meta, stream, sequence. ARGV: name, stream maxlen, hashes...
_REMOVE = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return redis.error_reply('NOBANK') end
local gone = {}
for i = 3, #ARGV do
  if redis.call('HDEL', KEYS[2], ARGV[i]) == 1 then gone[#gone + 1] = ARGV[i] end
end
if #gone == 0 then return {0, 0} end
local count = tonumber(redis.call('HGET', KEYS[3], 'count') or '0')
local version = redis.call('INCR', KEYS[5])
redis.call('HSET', KEYS[3], 'version', version, 'count', math.max(0, count - #gone))
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[2], '*', 'bank', ARGV[1], 'op', 'remove',
           'version', version, 'hashes', table.concat(gone, ' '))
return {version, #gone}
"""

# KEYS: registry, entries, meta, stream, sequence.
# ARGV: name, stream maxlen, max banks, spec json, recount (1: set count to the hash's size).
_SPEC = """
local exists = redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1
if not exists and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then
  return redis.error_reply('TOOMANY')
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[4])
local version = redis.call('INCR', KEYS[5])
local count = redis.call('HGET', KEYS[3], 'count')
if ARGV[5] == '1' or not count then count = redis.call('HLEN', KEYS[2]) end
redis.call('HSET', KEYS[3], 'version', version, 'count', count)
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[2], '*', 'bank', ARGV[1], 'op', 'spec',
           'version', version, 'hashes', '')
return version
"""

# KEYS: registry, entries, meta, stream, sequence. ARGV: name, stream maxlen.
_DROP = """
local existed = redis.call('HDEL', KEYS[1], ARGV[1]) + redis.call('DEL', KEYS[2], KEYS[3])
if existed == 0 then return 0 end
local version = redis.call('INCR', KEYS[5])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[2], '*', 'bank', ARGV[1], 'op', 'drop',
           'version', version, 'hashes', '')
return version
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entry_value(entry: BankEntry) -> str:
    if not entry.note and entry.quality is None:
        return ""
    body: dict[str, Any] = {}
    if entry.note:
        body["note"] = entry.note
    if entry.quality is not None:
        body["quality"] = entry.quality
    return json.dumps(body, separators=(",", ":"))


def _entry_from(hash_hex: str, value: str) -> BankEntry:
    if not value:
        return BankEntry(hash_hex)
    try:
        body = json.loads(value)
        return BankEntry(hash_hex, str(body.get("note", "")), body.get("quality"))
    except (ValueError, AttributeError):
        return BankEntry(hash_hex, value[:200])


@dataclass(frozen=True)
class BankState:
    """What Redis says about one bank at one moment."""

    name: str
    spec: BankSpec | None
    version: int | None
    count: int | None
    stored: int
    problem: str | None


def _check_state(name: str, raw_spec: Any, version: Any, count: Any, stored: int) -> BankState:
    spec: BankSpec | None = None
    problem: str | None = None
    if raw_spec is None:
        problem = (
            "no spec in the registry, but hashes or a meta record remain (half-written or edited by hand)"
        )
    else:
        try:
            spec = BankSpec.model_validate_json(raw_spec)
            if spec.name != name:
                problem = f"its spec names another bank ({spec.name!r})"
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "spec"
            problem = f"its spec does not validate ({where}: {first['msg']})"
    v = c = None
    if problem is None:
        try:
            v = int(_text(version)) if version is not None else None
            c = int(_text(count)) if count is not None else None
        except ValueError:
            problem = "its meta record is not numeric"
        else:
            if v is None or c is None:
                problem = "its meta record (version, count) is missing: half-written"
            elif c != stored:
                problem = (
                    f"{stored} hashes stored but its meta counts {c} (written or deleted outside modgate)"
                )
    return BankState(name, spec, v, c, stored, problem)


class BankStore:
    """The banks in Redis: what ``modgate banks`` reads and writes."""

    def __init__(self, redis: Any, settings: BankSettings) -> None:
        self.redis = redis
        self.settings = settings
        self._add = redis.register_script(_ADD)
        self._remove = redis.register_script(_REMOVE)
        self._spec = redis.register_script(_SPEC)
        self._drop = redis.register_script(_DROP)

    def _keys(self, name: str) -> list[str]:
        return [
            keys.BANKS,
            keys.bank_entries(name),
            keys.bank_meta(name),
            keys.BANK_CHANGES,
            keys.BANK_SEQUENCE,
        ]

    def _call(self, script: Any, name: str, args: list[Any]) -> Any:
        import redis as redis_lib

        try:
            return script(keys=self._keys(name), args=args)
        except redis_lib.exceptions.ResponseError as exc:
            message = str(exc)
            if "NOBANK" in message:
                raise BankStoreError(f"no bank named {name!r}", usage=True) from None
            if "FULL" in message:
                raise BankStoreError(
                    f"bank {name!r} would exceed banks.max_entries ({self.settings.max_entries} hashes)"
                ) from None
            if "TOOMANY" in message:
                raise BankStoreError(
                    f"there are already banks.max_banks ({self.settings.max_banks}) banks"
                ) from None
            raise

    # -- reading

    def snapshot(self, names: Iterable[str] | None = None) -> tuple[dict[str, BankState], str]:
        """Every bank's (or the named banks') spec, meta and size, and the changes stream's
        last entry id, read in one transaction."""
        wanted = sorted(set(names) if names is not None else {_text(n) for n in self.redis.hkeys(keys.BANKS)})
        pipe = self.redis.pipeline(transaction=True)
        pipe.hgetall(keys.BANKS)
        for name in wanted:
            pipe.hmget(keys.bank_meta(name), "version", "count")
            pipe.hlen(keys.bank_entries(name))
        pipe.xrevrange(keys.BANK_CHANGES, count=1)
        replies = pipe.execute()
        registry = {_text(k): v for k, v in replies[0].items()}
        out: dict[str, BankState] = {}
        for i, name in enumerate(wanted):
            (version, count), stored = replies[1 + 2 * i], int(replies[2 + 2 * i])
            if name not in registry and version is None and count is None and stored == 0:
                continue  # no such bank (or dropped)
            out[name] = _check_state(name, registry.get(name), version, count, stored)
        last_id = _text(replies[-1][0][0]) if replies[-1] else "0-0"
        return out, last_id

    def states(self, names: Iterable[str] | None = None) -> dict[str, BankState]:
        return self.snapshot(names)[0]

    def state(self, name: str) -> BankState | None:
        return self.states([name]).get(name)

    def spec(self, name: str) -> BankSpec:
        """The spec of a bank that validates; BankStoreError otherwise."""
        state = self.state(name)
        if state is None:
            raise BankStoreError(f"no bank named {name!r}", usage=True)
        if state.problem is not None or state.spec is None:
            raise BankStoreError(refusal(name, state.problem))
        return state.spec

    def entries(self, name: str) -> Iterator[BankEntry]:
        for field_, value in self.redis.hscan_iter(keys.bank_entries(name), count=10_000):
            yield _entry_from(_text(field_), _text(value))

    # -- writing

    def put_spec(self, spec: BankSpec, *, recount: bool = False) -> int:
        """Create a bank or change its category, action, distance or allow_pdq (its kind is
        fixed: a bank of another kind is another bank). ``recount`` sets the meta's count to
        the hashes stored (repairs a bank counted wrong). Returns the version."""
        existing = self.state(spec.name)
        if existing is not None and existing.spec is not None and existing.spec.kind != spec.kind:
            raise BankStoreError(
                f"bank {spec.name!r} holds {existing.spec.kind} hashes; a bank's kind cannot change",
                usage=True,
            )
        args = [
            spec.name,
            self.settings.changes_maxlen,
            self.settings.max_banks,
            spec.model_dump_json(),
            int(recount),
        ]
        return int(self._call(self._spec, spec.name, args))

    def add(self, name: str, entries: Sequence[BankEntry]) -> tuple[int, int]:
        """Add (or re-note) hashes in chunks; returns (new hashes, the bank's version)."""
        added, version = 0, 0
        for start in range(0, len(entries), CHUNK):
            args: list[Any] = [name, self.settings.changes_maxlen, self.settings.max_entries]
            for entry in entries[start : start + CHUNK]:
                args += [entry.hash, _entry_value(entry)]
            v, n = self._call(self._add, name, args)
            added += int(n)
            version = int(v) or version
        return added, version

    def remove(self, name: str, hashes: Sequence[str]) -> tuple[int, int]:
        """Remove hashes in chunks; returns (hashes removed, the bank's version)."""
        removed, version = 0, 0
        for start in range(0, len(hashes), CHUNK):
            args = [name, self.settings.changes_maxlen, *hashes[start : start + CHUNK]]
            v, n = self._call(self._remove, name, args)
            removed += int(n)
            version = int(v) or version
        return removed, version

    def replace(self, name: str, entries: Sequence[BankEntry]) -> tuple[int, int]:
        """Make the bank hold exactly ``entries``: the difference is added, then removed,
        as ordinary changes (workers apply them incrementally). Returns (added, removed)."""
        wanted = {e.hash for e in entries}
        stale = [_text(h) for h in self.redis.hkeys(keys.bank_entries(name)) if _text(h) not in wanted]
        added, _ = self.add(name, list(entries))
        removed, _ = self.remove(name, stale)
        return added, removed

    def drop(self, name: str) -> bool:
        return bool(self._call(self._drop, name, [name, self.settings.changes_maxlen]))


def refusal(name: str, problem: str | None) -> str:
    return (
        f"bank {name!r} in Redis does not validate: {problem}; workers keep their last good copy. "
        f"Rewrite it with `modgate banks import {name} FILE --replace --kind KIND`, or drop it "
        f"with `modgate banks remove {name} --all`"
    )
