"""Hash banks in a worker: matching (:class:`BankSet`) and keeping a worker's copy in step
(:class:`BankSync`) with the Redis copy every worker shares (:class:`BankStore`, what
``modgate banks`` writes; it lives in ``modgate.bank_store`` and is re-exported here).

Redis holds, per bank, its spec (in the registry ``keys.BANKS``), its hashes and a meta
record (``version``, ``count``); one Lua script per change writes them together and appends
the change (bank, op, version, hashes) to the changes stream ``keys.BANK_CHANGES``.
Versions come from one counter, so they never repeat, not even for a bank dropped and
created again. A worker loads every bank once, then applies the stream's entries as they
come (read every ``poll_interval_s``, jittered): an added hash is matchable within about a
poll interval, with no rebuild. Adding and removing a hash are idempotent, so replaying
any suffix of the stream onto a copy that already holds some of it gives the same bank;
that is what makes loading a bank (HSCAN, not atomic) safe while it changes.

Each poll also reads every bank's spec, meta and size in one transaction and checks the
copy against them. A bank that does not validate — a spec that does not parse, a meta
missing (half-written), a size that differs from its meta's count (hashes written or
deleted by hand), a stored hash that is not a hash — is refused: the worker keeps its last
good copy, says why in ``health()``, and loads the bank again once it validates. A worker
that fell behind the stream's kept history, or whose copy's version differs from the
meta's, loads the bank again after a random delay (``reload_jitter_s``), so a fleet never
reads a bank at the same moment. ``health()`` turns not ok when a copy is older than
``max_stale_s``.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modgate import keys

# The Redis side (BankStore, its scripts, BankState) lives in modgate.bank_store, light, since
# the review console writes its allow-list bank; these names stay importable from here.
from modgate.bank_store import CHUNK as CHUNK
from modgate.bank_store import BankState as BankState
from modgate.bank_store import BankStore as BankStore
from modgate.bank_store import BankStoreError as BankStoreError
from modgate.bank_store import _text
from modgate.bank_store import refusal as refusal
from modgate.banks import (
    HEX_DIGITS,
    PDQ_MIN_QUALITY,
    BankFormatError,
    BankSpec,
    normalize_hash,
    parse_bank_file,
)
from modgate.banks import entries_from_hashes as entries_from_hashes
from modgate.settings import BankSettings
from worker.judge.bank_index import PdqIndex, hex_to_codes

log = logging.getLogger("modgate.banks")


@dataclass(frozen=True)
class Match:
    """A hash of an image found in a bank."""

    bank: str
    kind: str
    hash: str  # the bank's hash
    distance: int
    category: str
    action: str
    allow_pdq: bool = False


# --------------------------------------------------------------------------- in memory


class Bank:
    """One bank's hashes in memory. Reads may run on any thread while the sync thread
    changes it (the PDQ index publishes snapshots; set membership is atomic)."""

    def __init__(self, spec: BankSpec) -> None:
        self.spec = spec

    def __len__(self) -> int:
        raise NotImplementedError

    def add(self, hashes: Sequence[str]) -> int:
        raise NotImplementedError

    def remove(self, hashes: Sequence[str]) -> int:
        raise NotImplementedError

    def __contains__(self, hex_hash: object) -> bool:
        raise NotImplementedError

    def memory_bytes(self) -> int:
        raise NotImplementedError

    def _match(self, hex_hash: str, distance: int) -> Match:
        s = self.spec
        return Match(s.name, s.kind, hex_hash, distance, s.category, s.action, s.allow_pdq)


class ExactBank(Bank):
    """MD5 or SHA-256: a set of digests (as bytes: ~half the memory of hex strings)."""

    def __init__(self, spec: BankSpec, hashes: Iterable[str] = ()) -> None:
        super().__init__(spec)
        self._digests: set[bytes] = {bytes.fromhex(h) for h in hashes}

    def __len__(self) -> int:
        return len(self._digests)

    def add(self, hashes: Sequence[str]) -> int:
        before = len(self._digests)
        self._digests.update(bytes.fromhex(h) for h in hashes)
        return len(self._digests) - before

    def add_digests(self, digests: Iterable[bytes]) -> None:
        self._digests.update(digests)

    def remove(self, hashes: Sequence[str]) -> int:
        before = len(self._digests)
        self._digests.difference_update(bytes.fromhex(h) for h in hashes)
        return before - len(self._digests)

    def __contains__(self, hex_hash: object) -> bool:
        return isinstance(hex_hash, str) and bytes.fromhex(hex_hash) in self._digests

    def match(self, hex_hash: str) -> Match | None:
        return self._match(hex_hash, 0) if bytes.fromhex(hex_hash) in self._digests else None

    def memory_bytes(self) -> int:
        # bytes object (33 + digest) and a set slot (~16 B at its load factor) per hash.
        return len(self._digests) * (33 + HEX_DIGITS[self.spec.kind] // 2 + 16)


class PdqBank(Bank):
    def __init__(self, spec: BankSpec, hashes: Iterable[str] = ()) -> None:
        super().__init__(spec)
        self.index = PdqIndex()
        self.index.add(list(hashes))

    def __len__(self) -> int:
        return len(self.index)

    def add(self, hashes: Sequence[str]) -> int:
        return self.index.add(list(hashes))

    def add_codes(self, codes: np.ndarray) -> int:
        return self.index.add_codes(codes)

    def remove(self, hashes: Sequence[str]) -> int:
        return self.index.remove(list(hashes))

    def __contains__(self, hex_hash: object) -> bool:
        return isinstance(hex_hash, str) and hex_hash in self.index

    def match(self, hex_hash: str) -> list[Match]:
        radius = self.spec.max_distance if self.spec.max_distance is not None else 31
        return [self._match(h, d) for h, d in self.index.search(hex_hash, radius)]

    def memory_bytes(self) -> int:
        return self.index.memory_bytes()


def new_bank(spec: BankSpec, hashes: Iterable[str] = ()) -> Bank:
    return PdqBank(spec, hashes) if spec.kind == "pdq" else ExactBank(spec, hashes)


class BankSet:
    """The banks a worker matches against, by name. ``modgate scan --bank`` builds one from
    files; a :class:`BankSync` keeps one in step with Redis."""

    def __init__(self, banks: Mapping[str, Bank] | Iterable[Bank] = ()) -> None:
        items = banks.values() if isinstance(banks, Mapping) else banks
        self._banks: dict[str, Bank] = {b.spec.name: b for b in items}

    @classmethod
    def from_files(cls, specs_and_paths: Iterable[tuple[BankSpec, str | Path]]) -> BankSet:
        """Banks from files (any format ``modgate.banks.parse_bank_file`` reads); a
        :class:`BankFormatError` names the file and line of the first problem."""
        banks = []
        for spec, path in specs_and_paths:
            entries = parse_bank_file(path, spec.kind)
            banks.append(new_bank(spec, [e.hash for e in entries]))
        names = [b.spec.name for b in banks]
        if len(set(names)) != len(names):
            raise BankFormatError(f"bank names repeat: {', '.join(sorted(names))}")
        return cls(banks)

    def __len__(self) -> int:
        return len(self._banks)

    def __iter__(self) -> Iterator[Bank]:
        return iter(list(self._banks.values()))

    def __contains__(self, name: object) -> bool:
        return name in self._banks

    def get(self, name: str) -> Bank | None:
        return self._banks.get(name)

    def names(self) -> list[str]:
        return sorted(self._banks)

    def with_bank(self, bank: Bank) -> BankSet:
        return BankSet({**self._banks, bank.spec.name: bank})

    def without(self, name: str) -> BankSet:
        return BankSet({n: b for n, b in self._banks.items() if n != name})

    def match(
        self, md5: str | None, sha256: str | None, pdqs: Sequence[tuple[str, int | None]] = ()
    ) -> list[Match]:
        return [*self.match_exact(md5, sha256), *self.match_pdq(pdqs)]

    def match_exact(self, md5: str | None, sha256: str | None) -> list[Match]:
        """Banks of MD5 and SHA-256 hashes: exact matches of the bytes' digests."""
        given = {"md5": md5, "sha256": sha256}
        out: list[Match] = []
        for bank in list(self._banks.values()):
            digest = given.get(bank.spec.kind)
            if digest and isinstance(bank, ExactBank):
                found = bank.match(normalize_hash(bank.spec.kind, digest))
                if found is not None:
                    out.append(found)
        return out

    def match_pdq(self, pdqs: Sequence[tuple[str, int | None]]) -> list[Match]:
        """PDQ banks against each frame's (hex, quality): the nearest hit per bank hash.
        A frame of quality below 50 is never matched (flat images collide)."""
        frames = [normalize_hash("pdq", h) for h, q in pdqs if q is None or q >= PDQ_MIN_QUALITY]
        if not frames:
            return []
        best: dict[tuple[str, str], Match] = {}
        for bank in list(self._banks.values()):
            if not isinstance(bank, PdqBank):
                continue
            for frame in frames:
                for m in bank.match(frame):
                    key = (m.bank, m.hash)
                    if key not in best or m.distance < best[key].distance:
                        best[key] = m
        return sorted(best.values(), key=lambda m: (m.bank, m.distance, m.hash))


# --------------------------------------------------------------------------- sync


@dataclass
class _Copy:
    """A worker's copy of one bank and how it stands against Redis."""

    bank: Bank | None = None  # the last good copy (None before the first load)
    version: int = 0
    synced_at: float | None = None  # when the copy last equalled Redis
    problem: str | None = None  # why Redis's bank is refused now
    reload_at: float | None = None  # a load is due at this monotonic time
    reloads: int = 0
    failed_version: int | None = None  # a load found an invalid hash at this version


class BankSync:
    """Keeps a :class:`BankSet` in step with the banks in Redis (see the module docstring).

    ``start()`` loads every bank (a worker should not judge before it has its banks) and
    starts the polling thread; ``banks`` is the current set; ``health()`` its state."""

    def __init__(self, redis: Any, settings: Any) -> None:
        self.redis = redis
        self.settings: BankSettings = settings.banks if hasattr(settings, "banks") else settings
        self.store = BankStore(redis, self.settings)
        self._banks = BankSet()
        self._copies: dict[str, _Copy] = {}
        self._cursor: str | None = None  # last stream entry applied; None: load everything
        self._started = time.monotonic()
        self._loaded = False
        self._error: str | None = None
        self._error_since: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._poll_lock = threading.Lock()
        self._rng = random.Random()
        self.polls = 0
        self.full_loads = 0

    @property
    def banks(self) -> BankSet:
        return self._banks

    def __call__(self) -> BankSet:
        return self._banks

    # -- lifecycle

    def start(self) -> None:
        try:
            self.poll()
        except Exception as exc:  # Redis down at start: the thread keeps trying
            self._failed(exc)
        self._thread = threading.Thread(target=self._run, name="modgate-banks", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.settings.poll_interval_s * self._rng.uniform(0.5, 1.5)):
            try:
                self.poll()
            except Exception as exc:  # never let the thread die
                self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        message = f"{type(exc).__name__}: {exc}"
        if message != self._error:
            log.warning("hash banks: cannot sync with Redis: %s (keeping the copies held)", message)
            self._error_since = time.monotonic()
        self._error = message

    # -- one poll

    def poll(self) -> None:
        """Read the banks' state and new changes once; load what must be loaded."""
        with self._poll_lock:
            self._poll()
            self.polls += 1
            if self._error is not None:
                log.info("hash banks: Redis reachable again")
            self._error = self._error_since = None

    def _poll(self) -> None:
        now = time.monotonic()
        names = set(self._copies) | {_text(n) for n in self.redis.hkeys(keys.BANKS)}
        states, last_id = self.store.snapshot(names)
        initial = self._cursor is None
        if (
            not initial
            and self._cursor != "0-0"
            and not self.redis.xrange(keys.BANK_CHANGES, self._cursor, self._cursor)
        ):
            # The entry we stopped at was trimmed: changes after it may be lost. Load
            # every bank again (jittered: the whole fleet may be in the same spot).
            log.warning("hash banks: fell behind the changes stream's kept history; loading every bank again")
            self.full_loads += 1
            for name in states:
                self._schedule(name, now, jitter=True)
            self._cursor = last_id
        elif not initial:
            self._apply_changes(self._cursor, last_id)
            self._cursor = last_id
        else:
            self._cursor = last_id

        banks = self._banks
        for name in list(self._copies):
            if name not in states:  # dropped cleanly (its keys are gone)
                del self._copies[name]
                banks = banks.without(name)
        for name, state in states.items():
            copy = self._copies.setdefault(name, _Copy())
            if state.problem is not None:
                if copy.problem != state.problem:
                    log.error("%s", refusal(name, state.problem))
                copy.problem = state.problem
                copy.reload_at = None
                continue
            assert state.spec is not None and state.version is not None
            if copy.problem is not None and copy.failed_version == state.version:
                continue  # a load found an invalid hash; nothing has changed since
            if copy.problem is not None or copy.bank is None or copy.version != state.version:
                if copy.reload_at is None:
                    # First sight, or a bank valid again: load it. Versions that differ
                    # after the stream was applied mean changes the stream did not carry.
                    self._schedule(name, now, jitter=not initial and copy.bank is not None)
                    if copy.problem is not None:
                        log.warning("hash banks: bank %r validates again; loading it", name)
                    copy.problem = None
            else:
                copy.synced_at = now
                if copy.bank.spec != state.spec:
                    copy.bank.spec = state.spec  # category, action, distance: no reload
            if copy.reload_at is not None and copy.reload_at <= now:
                loaded = self._load(name, state)
                if loaded is not None:
                    banks = banks.with_bank(loaded)
        self._banks = banks
        self._loaded = True

    def _schedule(self, name: str, now: float, jitter: bool) -> None:
        copy = self._copies.setdefault(name, _Copy())
        delay = self._rng.uniform(0, self.settings.reload_jitter_s) if jitter else 0.0
        copy.reload_at = now + delay

    def _load(self, name: str, state: BankState) -> Bank | None:
        """The bank as HSCAN reads it now (changes during the scan are replayed by later
        polls); None, keeping the last good copy, if a stored hash is not a hash."""
        copy = self._copies[name]
        spec = state.spec
        assert spec is not None and state.version is not None
        copy.reload_at = None
        started = time.monotonic()
        try:
            bank = self._read_bank(spec, copy.bank)
        except BankFormatError as exc:
            copy.problem = f"a stored hash is not valid: {exc}"
            copy.failed_version = state.version
            log.error("%s", refusal(name, copy.problem))
            return None
        copy.bank = bank
        copy.version = state.version
        copy.synced_at = time.monotonic()
        copy.reloads += 1
        log.info(
            "hash banks: loaded %r (%s, %d hashes, version %d) in %.2f s",
            name,
            spec.kind,
            len(bank),
            state.version,
            time.monotonic() - started,
        )
        return bank

    def _pages(self, spec: BankSpec) -> Iterator[list[str]]:
        """The bank's hashes as HSCAN reads them, a validated page at a time
        (BankFormatError on the first page holding something that is not a hash)."""
        digits = HEX_DIGITS[spec.kind]
        cursor = 0
        while True:
            cursor, page = self.redis.hscan(keys.bank_entries(spec.name), cursor, count=10_000)
            fields = [_text(f) for f in page]
            if fields:
                _validate_page(spec.kind, fields, digits)
                yield fields
            if int(cursor) == 0:
                return

    def _read_bank(self, spec: BankSpec, held: Bank | None = None) -> Bank:
        """The bank as Redis holds it. A PDQ copy already held is brought to it in place
        (``PdqIndex.reconcile``: only the difference is written, and nothing at all if a page
        does not validate), so a 10⁷-hash bank loaded again is never held twice."""
        if spec.kind == "pdq":
            codes = (hex_to_codes(fields) for fields in self._pages(spec))
            if isinstance(held, PdqBank):
                held.index.reconcile(codes)
                held.spec = spec
                return held
            bank = PdqBank(spec)
            pages = list(codes)
            if pages:
                bank.add_codes(np.concatenate(pages))  # one build: cheaper than many merges
            return bank
        exact = ExactBank(spec)
        exact.add_digests(bytes.fromhex(f) for fields in self._pages(spec) for f in fields)
        return exact

    def _apply_changes(self, after: str, until: str) -> None:
        """The stream's entries in (after, until], applied in order to the copies held."""
        start = "(" + after if after != "0-0" else "-"
        while True:
            entries = self.redis.xrange(keys.BANK_CHANGES, start, until, count=200)
            if not entries:
                return
            runs: list[tuple[str, str, list[str], int]] = []
            for _entry_id, fields in entries:
                f = {_text(k): _text(v) for k, v in fields.items()}
                name, op, version = f.get("bank", ""), f.get("op", ""), int(f.get("version", "0") or 0)
                hashes = f.get("hashes", "").split()
                if runs and runs[-1][0] == name and runs[-1][1] == op and op in ("add", "remove"):
                    runs[-1][2].extend(hashes)
                    runs[-1] = (name, op, runs[-1][2], version)
                else:
                    runs.append((name, op, hashes, version))
            for name, op, hashes, version in runs:
                self._apply(name, op, hashes, version)
            start = "(" + _text(entries[-1][0])

    def _apply(self, name: str, op: str, hashes: list[str], version: int) -> None:
        copy = self._copies.get(name)
        if copy is None or copy.bank is None or copy.problem is not None or copy.reload_at is not None:
            return  # not held, refused (frozen), or about to be loaded anyway
        if op == "drop":
            self._copies.pop(name, None)
            self._banks = self._banks.without(name)
            return
        if op in ("add", "remove"):
            kind = copy.bank.spec.kind
            good = []
            for h in hashes:
                try:
                    good.append(normalize_hash(kind, h))
                except BankFormatError:
                    # Not written by modgate: load the bank again (which validates it).
                    copy.reload_at = time.monotonic()
                    return
            (copy.bank.add if op == "add" else copy.bank.remove)(good)
        copy.version = max(copy.version, version)

    # -- health

    def health(self) -> dict[str, Any]:
        """The banks' state for /readyz and ``modgate health``: ``ok`` is false before the
        first load, and when any copy is older than ``banks.max_stale_s``."""
        now = time.monotonic()
        banks: dict[str, Any] = {}
        refused, stale = [], []
        for name, copy in sorted(dict(self._copies).items()):
            since = copy.synced_at if copy.synced_at is not None else self._started
            age = now - since
            entry: dict[str, Any] = {
                "kind": copy.bank.spec.kind if copy.bank else None,
                "hashes": len(copy.bank) if copy.bank else 0,
                "version": copy.version,
                "age_s": round(age, 1),
                "state": "refused" if copy.problem else ("loading" if copy.bank is None else "ok"),
            }
            if copy.problem:
                entry["error"] = copy.problem
                refused.append(name)
            if age > self.settings.max_stale_s:
                stale.append(name)
            banks[name] = entry
        out: dict[str, Any] = {
            "ok": self._loaded and not stale,
            "loaded": self._loaded,
            "banks": banks,
            "refused": refused,
            "stale": stale,
            "max_stale_s": self.settings.max_stale_s,
        }
        if self._error is not None:
            out["error"] = self._error
            if not self._loaded and now - self._started > self.settings.max_stale_s:
                out["ok"] = False
        return out


def _validate_page(kind: str, fields: list[str], digits: int) -> None:
    """Every field a lowercase hex hash of ``kind`` (one pass for the common case)."""
    joined = "".join(fields)
    try:
        ok = (
            len(joined) == digits * len(fields)
            and joined == joined.lower()
            and len(bytes.fromhex(joined)) * 2 == len(joined)
        )
    except ValueError:
        ok = False
    if not ok:
        for f in fields:
            normalize_hash(kind, f)
            if f != f.lower():
                raise BankFormatError(f"not lowercase: {f[:72]!r}")
