"""An exact radius index over PDQ hashes (256 bits): every stored hash within the query's
Hamming radius (≤ 31) is returned, none missed, in time sub-linear in the bank's size.

Multi-index hashing (Norouzi, Punjani & Fleet): the hash is cut into ``CHUNKS`` = 11 chunks
of 23 bits (the last 3 bits belong to none). If a stored hash is within ``r = 11·s + a``
of the query, then one of the chunks ``0..a`` differs by at most ``s`` bits, or one of the
chunks ``a+1..10`` by at most ``s - 1`` (otherwise the distance would be at least
``(a+1)(s+1) + (10-a)s = r + 1``). So for each chunk we look up the buckets of every key
within that many bits of the query's chunk (at r = 31: 10 × 277 + 24 = 2,794 buckets),
and compare the full 256 bits of what they hold with a popcount. No bucket that can hold
a match is skipped: the result equals a brute-force scan (``tests/unit/test_banks_index.py``).

Layout (one index per bank), flat so that a lookup is a dozen numpy calls:

- ``codes``: row slots of 4 native uint64 (the big-endian words of the hash), ``alive`` a
  flag per slot. A row keeps its slot for life; slots freed by removals are reused.
- ``ids``: ``REGIONS`` = 12 regions of ``stride`` uint32 slot numbers. Each chunk's table
  (its rows sorted by the chunk's top ``p`` bits) fills the start of one region; the 12th
  region is spare. ``offsets``: 12 regions of ``2^p + 1`` bucket ends (absolute positions
  in ``ids``; a region's last end is its own). A snapshot maps each chunk to its region.
  ``p`` grows with the bank (about log2 of its rows, at most 23), so a bucket holds about
  one row: at 10⁷ hashes ~1.2 GB (``ids`` 480 MB, ``offsets`` 400 MB, ``codes`` 330 MB).
- ``codes``/``alive``/``ids`` live in address space reserved up front (``_reserve``: an
  anonymous private mapping; a page costs memory only once written), room for 2^24 rows or
  twice the bank, so they never move or grow while a bank stays under 16.7 M hashes. (Under
  strict overcommit they are ordinary arrays a quarter larger than needed, copied when
  outgrown.)

Updates are incremental: new rows go to a small ``delta`` buffer that lookups scan by
brute force. When it would outgrow ``delta_max`` (or a batch is that large, which is
merged before it is published, so lookups never scan a large delta) the delta is merged
into the tables ONE CHUNK AT A TIME: the chunk's table plus the new rows, minus the removed
ones, is written (one linear pass, no re-sort) into the spare region, a snapshot pointing
the chunk at it is published, and the region the chunk left is the next spare. Extra memory
while a merge runs: temporaries of about a region's size (~50 MB at 10⁷, ~110 MB when it
drops dead rows), not a second set of tables. Removed rows are marked dead at once and
leave the tables at the next merge (one is forced when a quarter of the tabled rows are
dead); their slots take the next new rows. Only the first merge, ``p`` changing (the bank
doubled below 2^23 rows or shrank to a quarter) and the reservation outgrown build all
tables anew, beside the old ones.

Why every lookup is exact, even one that reads a half-merged snapshot:

- Every row present before the merge is in every chunk's table, old or merged, so whichever
  chunk's probes reach it, it is found (rows removed before the merge are dropped by their
  ``alive`` flag, wherever they are). Delta rows stay in the published delta, scanned by
  brute force, until the last snapshot of the merge, which has them in every table; they are
  marked alive in their slots just before it (found twice meanwhile: results are deduplicated
  by hash). Rows of a batch being added are not alive until then: a lookup never sees a
  half-added batch through some chunks only.

Why a region (or a freed slot) is never written while a lookup may read it:

- Lookups take no lock: each registers the writers' epoch (``_readers``, a dict keyed by
  thread, set before it reads ``_snap`` and cleared when it returns, also on error), and
  every publish bumps the epoch. A region is written only when no published snapshot maps a
  chunk to it and ``_drain`` has seen every registered lookup start after the publish that
  unmapped it; a slot is reused only after the merge that dropped it from every table and
  such a drain. Rows past a snapshot's ``top`` and delta rows past its ``delta_n`` are
  written freely: no snapshot reaches them. Lookups run ~0.2 ms, so a drain is short.

Writers (one thread: the bank sync) hold ``_lock``; lookups from any thread never wait.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, replace
from functools import lru_cache
from itertools import combinations

import faiss
import numpy as np

BITS = 256
CHUNKS = 11
CHUNK_BITS = 23
MAX_RADIUS = 31  # what the chunking above is exact for (up to 32), and PDQ's usual threshold
REGIONS = CHUNKS + 1  # a table region per chunk, and the spare a merge writes into
_CHUNK_MASK = (1 << CHUNK_BITS) - 1
_SHIFTS = tuple(BITS - CHUNK_BITS * (j + 1) for j in range(CHUNKS))
_ROW = np.dtype((np.void, 32))
_MIN_P, _MAX_P = 8, CHUNK_BITS
_RESERVE_ROWS = 1 << 24  # address space reserved per array, in rows, at least
HUGE_PAGE_ROWS = 1 << 20  # banks this large get huge pages (``_huge_pages``)
_MAX_STRIDE = (1 << 32) // REGIONS - 1  # positions in ``ids`` are uint32
_BLOCK = 1 << 20  # rows per step of a pass whose temporaries would otherwise be table-sized


def hex_to_codes(hexes: list[str] | tuple[str, ...]) -> np.ndarray:
    """64-hex-digit hashes (already validated) → (n, 4) native uint64 rows."""
    if not hexes:
        return np.empty((0, 4), np.uint64)
    raw = bytes.fromhex("".join(hexes))
    return np.frombuffer(raw, dtype=">u8").reshape(-1, 4).astype(np.uint64)


def codes_to_hex(rows: np.ndarray) -> list[str]:
    data = np.ascontiguousarray(rows, dtype=np.uint64).astype(">u8").tobytes()
    return [data[i : i + 32].hex() for i in range(0, len(data), 32)]


def _hex(row: np.ndarray) -> str:
    return row.astype(">u8").tobytes().hex()


@lru_cache(maxsize=1)
def _lends_address_space() -> bool:
    """Whether untouched pages are free: not under Linux's strict overcommit (mode 2), which
    charges a reservation in full against the memory the whole process may commit."""
    try:
        with open("/proc/sys/vm/overcommit_memory") as f:
            return f.read().strip() != "2"
    except OSError:
        return True


def _huge_pages(array: np.ndarray) -> None:
    """Ask for huge pages on the reserved mapping under ``array`` (if it is one). Only for
    large banks: lookups gather rows at random, and 4 KiB pages cost a TLB miss each (~15 %
    of a lookup at 10⁷); but a huge page is 2 MiB of memory once touched, and a small bank
    touches a page in each of its 12 regions (measured: 30 banks of 5,100 hashes took 798 MiB
    with huge pages, a few MiB without)."""
    base = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    if base is not None and hasattr(mmap, "MADV_HUGEPAGE"):
        base.madvise(mmap.MADV_HUGEPAGE)


def _reserve(want: int, need: int, dtype: type, width: int = 1, huge: bool = False) -> np.ndarray:
    """A zeroed (rows, width) array (1-D if width is 1) of ``want`` rows, in address space
    reserved from the OS: untouched pages cost no memory, so room to grow is free. Where
    the OS will not lend address space (strict overcommit, an address-space limit),
    ``need`` rows of ordinary memory. ``huge``: ask for huge pages (a large bank)."""
    itemsize = np.dtype(dtype).itemsize * width
    out = None
    if _lends_address_space():
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
        try:
            buf = mmap.mmap(-1, max(1, want * itemsize), flags=flags)
        except (AttributeError, OSError, ValueError):
            pass
        else:
            out = np.frombuffer(buf, dtype, want * width)  # unmapped once no array uses it
            if huge:
                _huge_pages(out)
    if out is None:
        out = np.zeros(need * width, dtype)
    return out.reshape(-1, width) if width > 1 else out


def _chunk_key(codes: np.ndarray, j: int, p: int, rows: np.ndarray | None = None) -> np.ndarray:
    """The bucket key of chunk ``j`` (the top ``p`` of its 23 bits) of every row of
    ``codes``, or of ``codes[rows]``; a block at a time, so the temporaries stay small."""
    n = len(codes) if rows is None else len(rows)
    out = np.empty(n, np.uint32)
    w, off = divmod(CHUNK_BITS * j, 64)
    for i in range(0, n, _BLOCK):
        at = slice(i, i + _BLOCK) if rows is None else rows[i : i + _BLOCK]
        if off + CHUNK_BITS <= 64:
            v = codes[at, w] >> np.uint64(64 - off - CHUNK_BITS)
        else:
            hi = 64 - off
            lo = CHUNK_BITS - hi
            v = (codes[at, w] << np.uint64(lo)) | (codes[at, w + 1] >> np.uint64(64 - lo))
        v &= np.uint64(_CHUNK_MASK)
        v >>= np.uint64(CHUNK_BITS - p)
        out[i : i + _BLOCK] = v
    return out


@lru_cache(maxsize=256)
def _probes(p: int, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """The buckets to look up for a query at ``radius``: (the chunk of each probe, the bits
    it flips in that chunk's key), grouped by chunk."""
    s, a = divmod(radius, CHUNKS)
    chunk_of: list[int] = []
    flips: list[int] = []
    for j in range(CHUNKS):
        r = s if j <= a else s - 1
        for k in range(r + 1):
            for bits in combinations(range(p), k):
                chunk_of.append(j)
                flips.append(sum(1 << b for b in bits))
    return np.array(chunk_of, np.intp), np.array(flips, np.intp)


def _choose_p(rows: int) -> int:
    return int(min(_MAX_P, max(_MIN_P, int(rows - 1).bit_length() if rows > 1 else 0)))


def _gather(table: np.ndarray, at: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out[:] = table[at]`` (``out`` may be ``at``) a block at a time: numpy first turns
    uint32 positions into an intp copy of them all, 80 MB for a table at 10⁷."""
    for i in range(0, len(at), _BLOCK):
        np.take(table, at[i : i + _BLOCK], out=out[i : i + _BLOCK], mode="clip")
    return out


def _expand(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ranges [start, start + length) as one array of positions."""
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    if total == 0:
        return np.empty(0, np.int64)
    return np.arange(total, dtype=np.int64) + np.repeat(starts - (ends - lengths), lengths)


@dataclass(frozen=True, eq=False)
class _Snapshot:
    """Everything a lookup reads, published at once. Writers change in place only what no
    snapshot reaches (see the module docstring) and the ``alive`` flags."""

    p: int
    codes: np.ndarray  # (capacity, 4) uint64 row slots
    rows: np.ndarray  # the same memory, one 32-byte item per slot
    alive: np.ndarray  # (capacity,) bool
    top: int  # slots [0, top) have held rows
    ids: np.ndarray  # (REGIONS × stride,) uint32 slot numbers, the tables
    stride: int
    offsets: np.ndarray  # (REGIONS × (2^p + 1),) uint32: bucket ends, positions in ids
    starts: np.ndarray  # offsets[:-1]
    ends: np.ndarray  # offsets[1:]
    base: np.ndarray  # (CHUNKS,) intp: where each chunk's region starts in offsets
    probe_base: dict[int, np.ndarray]  # radius → base of each probe's chunk (filled lazily)
    tabled: bool  # whether the tables hold rows
    delta: np.ndarray  # (delta capacity, 4) uint64: rows not in the tables
    delta_alive: np.ndarray
    delta_n: int  # rows [0, delta_n) of delta are published
    delta_index: dict[bytes, int]  # row bytes → its position in delta


def _hamming(words: np.ndarray, block: np.ndarray) -> np.ndarray:
    """Hamming distance of one query (4 words) to each row of a contiguous block."""
    out = np.empty(len(block), np.int32)
    faiss.hammings(
        faiss.swig_ptr(words.view(np.uint8)),
        faiss.swig_ptr(block.view(np.uint8)),
        1,
        len(block),
        32,
        faiss.swig_ptr(out),
    )
    return out


class PdqIndex:
    """A set of PDQ hashes with exact radius search; see the module docstring."""

    def __init__(self, delta_max: int | None = None) -> None:
        _INDEXES.add(self)
        self._lock = threading.Lock()  # one writer at a time; readers never take it
        self._readers: dict[int, int] = {}  # thread id → epoch its lookup started in
        self._epoch = 0  # bumped by every publish
        self._delta_max = delta_max
        self._count = 0  # live rows
        self._tabled = 0  # rows per chunk table (live or dead)
        self._dead_tabled = 0  # of those, removed since
        self._free = np.empty(0, np.uint32)  # slots in no table, reusable after a drain
        self._top = 0  # slots [0, _top) have held rows (published as the snapshot's top)
        self._region = list(range(CHUNKS))  # chunk → its region
        self._spare = CHUNKS
        self._filled = [0] * REGIONS  # the most ids each region has held (memory in use)
        codes = np.zeros((0, 4), np.uint64)
        offsets = np.zeros(REGIONS * ((1 << _MIN_P) + 1), np.uint32)
        self._snap = _Snapshot(
            p=_MIN_P,
            codes=codes,
            rows=codes.view(_ROW).reshape(-1),
            alive=np.zeros(0, bool),
            top=0,
            ids=np.zeros(0, np.uint32),
            stride=0,
            offsets=offsets,
            starts=offsets[:-1],
            ends=offsets[1:],
            base=self._bases(_MIN_P),
            probe_base={},
            tabled=False,
            **self._new_delta(),
        )

    def __len__(self) -> int:
        return self._count

    # ----------------------------------------------------------------- lookups

    def search(self, hex_hash: str, radius: int) -> list[tuple[str, int]]:
        """Every stored hash within ``radius`` bits of ``hex_hash``: (hex, distance)."""
        if not 0 <= radius <= MAX_RADIUS:
            raise ValueError(f"radius must be 0..{MAX_RADIUS}, not {radius}")
        raw = bytes.fromhex(hex_hash)
        words = np.frombuffer(raw, ">u8").astype(np.uint64)
        me = threading.get_ident()
        self._readers[me] = self._epoch  # before reading _snap: see the module docstring
        try:
            return self._search(self._snap, raw, words, radius)
        finally:
            del self._readers[me]

    def _search(self, snap: _Snapshot, raw: bytes, words: np.ndarray, radius: int) -> list[tuple[str, int]]:
        tabled: dict[int, int] = {}
        if snap.tabled:
            chunk_of, flips = _probes(snap.p, radius)
            value = int.from_bytes(raw, "big")
            shift = CHUNK_BITS - snap.p
            keys = np.array([((value >> s) & _CHUNK_MASK) >> shift for s in _SHIFTS], np.intp)
            probe_base = snap.probe_base.get(radius)
            if probe_base is None:  # once per radius and region map (a race only repeats it)
                probe_base = snap.probe_base[radius] = snap.base[chunk_of]
            buckets = keys[chunk_of]
            buckets ^= flips
            buckets += probe_base
            starts = snap.starts[buckets].astype(np.intp)
            cand = snap.ids[_expand(starts, snap.ends[buckets] - starts)]
            if len(cand):
                dist = _hamming(words, np.take(snap.rows, cand))
                hit = np.flatnonzero(dist <= radius)
                # Few hits: plain Python is cheaper than more numpy calls. A row is found
                # once per chunk that led to it; removed rows are dropped.
                for i, d in zip(cand[hit].tolist(), dist[hit].tolist(), strict=True):
                    if i not in tabled and snap.alive[i]:
                        tabled[i] = d
        found = {_hex(snap.codes[i]): d for i, d in tabled.items()}
        if snap.delta_n:
            # The delta is a contiguous block of rows: no gather, one popcount pass.
            dist = _hamming(words, snap.delta[: snap.delta_n])
            hit = np.flatnonzero(dist <= radius)
            for k, d in zip(hit.tolist(), dist[hit].tolist(), strict=True):
                if snap.delta_alive[k]:
                    found.setdefault(_hex(snap.delta[k]), d)  # also tabled while merging
        return list(found.items())

    def __contains__(self, hex_hash: str) -> bool:
        codes = hex_to_codes([hex_hash])
        me = threading.get_ident()
        self._readers[me] = self._epoch
        try:
            slots, positions = self._find(self._snap, codes)
        finally:
            del self._readers[me]
        return bool(slots[0] >= 0 or positions[0] >= 0)

    def hashes(self) -> list[str]:
        me = threading.get_ident()
        self._readers[me] = self._epoch
        try:
            snap = self._snap
            out = codes_to_hex(snap.codes[np.flatnonzero(snap.alive[: snap.top])])
            delta = snap.delta[: snap.delta_n]
            out += codes_to_hex(delta[snap.delta_alive[: snap.delta_n]])
        finally:
            del self._readers[me]
        return list(dict.fromkeys(out))  # a row is in both while a merge ends

    def memory_bytes(self) -> int:
        """Bytes of memory the index's arrays use: the pages written, not the address
        space reserved for growth (see ``_reserve``)."""
        s = self._snap
        return (
            s.top * 33  # codes and alive
            + sum(self._filled) * 4  # ids
            + s.offsets.nbytes
            + s.delta.nbytes
            + s.delta_alive.nbytes
            + len(s.delta_index) * 120
        )

    # ----------------------------------------------------------------- updates

    def add(self, hexes: list[str] | tuple[str, ...]) -> int:
        """Add hashes (64 lowercase hex digits each); returns how many were new."""
        return self.add_codes(hex_to_codes(list(hexes)))

    def remove(self, hexes: list[str] | tuple[str, ...]) -> int:
        """Remove hashes; returns how many were present. Takes effect for lookups at once."""
        return self.remove_codes(hex_to_codes(list(hexes)))

    def reconcile(self, pages: Iterable[np.ndarray]) -> tuple[int, int]:
        """Make the index hold exactly the hashes of ``pages`` ((n, 4) native uint64 rows
        each), changing only what differs: a bank loaded whole again (a worker behind the
        changes stream, a refused bank valid again) needs no second index beside the one
        that keeps matching (~1.2 GB at 10⁷). Nothing changes until the last page is read,
        so a page that raises (a stored hash that is not one) leaves the index as it was.
        Extra memory: a flag per row, and the rows to add. Returns (added, removed)."""
        with self._lock:  # the pages are read against one snapshot: no merge in between
            snap = self._snap
            seen = np.zeros(snap.top, bool)
            seen_delta = np.zeros(snap.delta_n, bool)
            missing: list[np.ndarray] = []
            for page in pages:
                page = np.ascontiguousarray(page, dtype=np.uint64).reshape(-1, 4)
                slots, positions = self._find(snap, page)
                seen[slots[slots >= 0]] = True
                seen_delta[positions[positions >= 0]] = True
                new = (slots < 0) & (positions < 0)
                if new.any():
                    missing.append(page[new])
            stale = np.concatenate(
                [
                    snap.codes[np.flatnonzero(snap.alive[: snap.top] & ~seen)],
                    snap.delta[np.flatnonzero(snap.delta_alive[: snap.delta_n] & ~seen_delta)],
                ]
            )
        removed = self.remove_codes(stale)
        added = self.add_codes(np.concatenate(missing)) if missing else 0
        return added, removed

    def remove_codes(self, codes: np.ndarray) -> int:
        """Remove hashes given as (n, 4) native uint64 rows; returns how many were present."""
        if len(codes) == 0:
            return 0
        with self._lock:
            snap = self._snap
            slots, positions = self._find(snap, codes)
            slots = np.unique(slots[slots >= 0])
            positions = np.unique(positions[positions >= 0])
            gone = len(slots) + len(positions)
            if gone == 0:
                return 0
            snap.alive[slots] = False
            snap.delta_alive[positions] = False
            for k in positions.tolist():
                snap.delta_index.pop(snap.delta[k].tobytes(), None)
            self._count -= gone
            self._dead_tabled += len(slots)
            if self._dead_tabled > max(1024, self._tabled // 4):
                self._merge(np.empty((0, 4), np.uint64))  # drops them from the tables
            return gone

    def add_codes(self, codes: np.ndarray) -> int:
        """Add hashes given as (n, 4) native uint64 rows; returns how many were new."""
        if len(codes) == 0:
            return 0
        with self._lock:
            codes = _unique_rows(np.ascontiguousarray(codes, dtype=np.uint64))
            snap = self._snap
            slots, positions = self._find(snap, codes)
            new = (slots < 0) & (positions < 0)
            del slots, positions  # not held through a merge (2 × 8 bytes a row)
            if not new.all():
                codes = codes[new]
            del new
            n = len(codes)
            if n == 0:
                return 0
            self._count += n
            first, end = snap.delta_n, snap.delta_n + n
            if end <= len(snap.delta):
                snap.delta[first:end] = codes  # past delta_n: no snapshot reads it yet
                snap.delta_alive[first:end] = True
                for k, row in enumerate(codes.view(_ROW).reshape(-1).tolist(), first):
                    snap.delta_index[row] = k
                self._publish(delta_n=end)
            else:
                self._merge(codes)  # merged before they are published
            return n

    def _delta_limit(self, tabled: int) -> int:
        if self._delta_max is not None:
            return self._delta_max
        # A lookup scans the delta (~10 µs per 10,000 rows); a merge is a pass over the
        # tables (~1.5 s at 10⁷). Between 4 k and 32 k rows keeps both small.
        return int(min(32768, max(4096, tabled // 512)))

    def _new_delta(self, tabled: int = 0) -> dict[str, object]:
        size = self._delta_limit(tabled)
        return {
            "delta": np.zeros((size, 4), np.uint64),
            "delta_alive": np.zeros(size, bool),
            "delta_n": 0,
            "delta_index": {},
        }

    def _bases(self, p: int) -> np.ndarray:
        """Where each chunk's region starts in ``offsets``."""
        return np.array(self._region, np.intp) * ((1 << p) + 1)

    def _publish(self, **changes: object) -> _Snapshot:
        if "base" in changes:
            changes["probe_base"] = {}
        self._snap = replace(self._snap, **changes)  # type: ignore[arg-type]
        self._epoch += 1  # after _snap: a lookup that reads the new epoch sees the new snapshot
        return self._snap

    def _drain(self) -> None:
        """Wait until every running lookup started after the latest publish, so none reads
        what an older snapshot named (a region, a freed slot)."""
        epoch = self._epoch
        while any(e < epoch for e in self._readers.copy().values()):
            time.sleep(0.0001)

    def _find(self, snap: _Snapshot, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each code stored and alive: its slot if it is in the tables, its position in
        the delta if there; else -1 (exact match)."""
        slots = np.full(len(codes), -1, np.int64)
        positions = np.full(len(codes), -1, np.int64)
        if len(codes) == 0:
            return slots, positions
        if snap.delta_index:
            for j, row in enumerate(codes.view(_ROW).reshape(-1).tolist()):
                k = snap.delta_index.get(row)
                if k is not None and k < snap.delta_n and snap.delta_alive[k]:
                    positions[j] = k
        if not snap.tabled:
            return slots, positions
        buckets = _chunk_key(codes, 0, snap.p).astype(np.intp) + snap.base[0]
        starts = snap.starts[buckets].astype(np.int64)
        lengths = snap.ends[buckets].astype(np.int64) - starts
        owner = np.repeat(np.arange(len(codes)), lengths)
        cand = snap.ids[_expand(starts, lengths)]
        same = (snap.codes[cand] == codes[owner]).all(axis=1) & snap.alive[cand]
        slots[owner[same]] = cand[same]
        return slots, positions

    def _merge(self, new: np.ndarray) -> None:
        """Move the delta's live rows and ``new`` into the tables, and drop the dead rows
        from them: chunk by chunk, or all tables anew when ``p`` or the stride must change."""
        snap = self._snap
        delta = snap.delta[: snap.delta_n][snap.delta_alive[: snap.delta_n]]
        slots = self._place([delta, new])
        n = self._tabled - self._dead_tabled + len(slots)
        p = _choose_p(n)
        snap = self._snap
        if snap.tabled and snap.p - 1 <= p <= snap.p:
            p = snap.p  # p shrinks only once the bank is down to a quarter: no back and forth
            if n <= snap.stride:
                self._merge_chunks(slots, n)
                return
        self._rebuild(slots, p)

    def _place(self, parts: list[np.ndarray]) -> np.ndarray:
        """Slots for new rows — freed ones first, then past ``top`` — with the rows written
        there. They stay not alive until tables holding them are published."""
        self._drain()  # the freed slots left every table a publish ago: now nobody reads them
        k = sum(len(part) for part in parts)
        reused, self._free = self._free[:k], self._free[k:]
        snap = self._snap
        top = snap.top + k - len(reused)
        if top > len(snap.alive):
            snap = self._grow_slots(top)
        slots = np.concatenate([reused, np.arange(snap.top, top, dtype=np.uint32)])
        at = 0
        for part in parts:
            if not len(part):
                continue
            first = at - len(reused)
            if first >= 0:  # past top: a plain copy
                snap.codes[snap.top + first : snap.top + first + len(part)] = part
            else:
                snap.codes[slots[at : at + len(part)]] = part
            at += len(part)
        self._top = top
        return slots

    def _grow_slots(self, rows: int) -> _Snapshot:
        """Room for ``rows`` slots: a new reservation holding the used slots at the same
        numbers (the tables stay valid). Only past the reservation: 2^24 rows, or twice
        the bank."""
        snap = self._snap
        huge = rows >= HUGE_PAGE_ROWS
        codes = _reserve(max(_RESERVE_ROWS, 2 * rows), rows + rows // 4, np.uint64, 4, huge)
        alive = _reserve(len(codes), len(codes), bool, huge=huge)
        codes[: snap.top] = snap.codes[: snap.top]
        alive[: snap.top] = snap.alive[: snap.top]
        return self._publish(codes=codes, rows=codes.view(_ROW).reshape(-1), alive=alive)

    def _merge_chunks(self, slots: np.ndarray, n: int) -> None:
        """One chunk at a time: its table plus ``slots``, minus the dead rows, into the
        spare region (one linear pass: the tables are not sorted again); publish; the region
        it left is the next spare."""
        snap = self._snap
        buckets = 1 << snap.p
        ids, offsets, stride, old_n = snap.ids, snap.offsets, snap.stride, self._tabled
        dead = self._dead_tabled > 0
        dropped = np.empty(0, np.uint32)
        ranks = np.arange(len(slots), dtype=np.int64)
        for j in range(CHUNKS):
            src, dst = self._region[j], self._spare
            part = ids[src * stride : src * stride + old_n]
            # Where each bucket of the table ends, counted from the table's start.
            ends = offsets[src * (buckets + 1) + 1 : (src + 1) * (buckets + 1)] - np.uint32(src * stride)
            if dead:
                live = _gather(snap.alive, part, np.empty(old_n, bool))
                gone = np.flatnonzero(~live)  # where the dead rows are in the table
                if j == 0:
                    dropped = part[gone]
                part = part[live]
                del live
                for i in range(0, buckets, _BLOCK):  # each end moves back by the dead before it
                    block = ends[i : i + _BLOCK]
                    block -= np.searchsorted(gone, block).astype(np.uint32)
                del gone
            keys = _chunk_key(snap.codes, j, snap.p, slots)
            order = np.argsort(keys, kind="stable")
            keys = keys[order]
            # A new row in bucket b lands after the bucket's old rows and the new rows of
            # buckets ≤ b sorted before it: at ends[b] + its rank.
            dest = ends[keys].astype(np.int64) + ranks
            old_rows = np.ones(n, bool)
            old_rows[dest] = False
            uniq, count = np.unique(keys, return_counts=True)
            # Now the writes. Drained only here: the work above gave the lookups that might
            # still read the spare (it left the map a publish ago) time to end.
            self._drain()
            out = ids[dst * stride : dst * stride + n]
            out[dest] = slots[order]
            out[old_rows] = part
            del old_rows, part
            table = offsets[dst * (buckets + 1) : (dst + 1) * (buckets + 1)]
            table[0] = dst * stride
            new_ends = table[1:]
            new_ends[:] = 0
            new_ends[uniq] = count
            np.cumsum(new_ends, dtype=np.uint32, out=new_ends)
            new_ends += ends
            new_ends += np.uint32(dst * stride)
            del ends
            self._filled[dst] = max(self._filled[dst], n)
            self._region[j], self._spare = dst, src
            self._publish(base=self._bases(snap.p))
        self._free = np.concatenate([self._free, dropped.astype(np.uint32)])
        self._finish(slots, n)

    def _rebuild(self, slots: np.ndarray, p: int) -> None:
        """All tables anew, beside the old ones (which serve lookups meanwhile), from every
        live slot and ``slots``: the first build, ``p`` changing, or the stride outgrown."""
        snap = self._snap
        live = np.flatnonzero(snap.alive[: snap.top])
        n = len(live) + len(slots)
        rows: np.ndarray | None = None  # None: rows are slots 0..n-1, read without a gather
        if not (len(live) == snap.top and len(slots) == self._top - snap.top):  # else gaps
            rows = np.concatenate([live.astype(np.uint32), slots])
        del live
        if n > _MAX_STRIDE:
            raise MemoryError(f"a PDQ index holds at most {_MAX_STRIDE} hashes")
        want = min(_MAX_STRIDE, max(_RESERVE_ROWS, 2 * n))
        huge = n >= HUGE_PAGE_ROWS
        if huge:  # reserved while the bank was small: huge pages from now on
            _huge_pages(snap.codes)
            _huge_pages(snap.alive)
        ids = _reserve(REGIONS * want, REGIONS * min(_MAX_STRIDE, n + n // 4 + 1), np.uint32, huge=huge)
        stride = len(ids) // REGIONS
        buckets = 1 << p
        offsets = np.zeros(REGIONS * (buckets + 1), np.uint32)
        for j in range(CHUNKS):
            keys = _chunk_key(snap.codes if rows is not None else snap.codes[:n], j, p, rows)
            order = np.argsort(keys, kind="stable")
            out = ids[j * stride : j * stride + n]
            if rows is None:
                out[:] = order
            else:
                np.take(rows, order, out=out)
            del order
            table = offsets[j * (buckets + 1) : (j + 1) * (buckets + 1)]
            table[0] = j * stride
            new_ends = table[1:]
            new_ends[:] = np.bincount(keys, minlength=buckets)
            del keys
            np.cumsum(new_ends, dtype=np.uint32, out=new_ends)
            new_ends += np.uint32(j * stride)
        self._region = list(range(CHUNKS))
        self._spare = CHUNKS
        self._filled = [n] * CHUNKS + [0]
        self._publish(
            p=p,
            ids=ids,
            stride=stride,
            offsets=offsets,
            starts=offsets[:-1],
            ends=offsets[1:],
            base=self._bases(p),
        )
        self._free = np.empty(0, np.uint32)  # set by _finish: every slot not alive
        self._finish(slots, n, free_all_dead=True)

    def _finish(self, slots: np.ndarray, n: int, free_all_dead: bool = False) -> None:
        """The last step of a merge: the new rows turn alive, and the snapshot with every
        chunk merged and an empty delta is published."""
        snap = self._snap
        snap.alive[slots] = True
        if free_all_dead:
            self._free = np.flatnonzero(~snap.alive[: self._top]).astype(np.uint32)
        self._tabled = n
        self._dead_tabled = 0
        self._publish(top=self._top, tabled=n > 0, **self._new_delta(n))


_INDEXES: weakref.WeakSet[PdqIndex] = weakref.WeakSet()


def _forget_readers() -> None:
    """In a forked child only the forking thread lives on, and it is in no lookup: the
    lookups registered by the parent's other threads will never end there."""
    for index in list(_INDEXES):
        index._readers.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_readers)


def _unique_rows(codes: np.ndarray) -> np.ndarray:
    """Rows without repeats, in their first order. Sorted by the first word only (cheap);
    rows sharing a first word — repeats, and rare collisions — are compared in full."""
    if len(codes) < 2:
        return codes
    order = np.argsort(codes[:, 0], kind="stable")
    first = codes[order, 0]
    same = np.flatnonzero(first[1:] == first[:-1])
    if len(same) == 0:
        return codes
    crowd = np.unique(np.concatenate([order[same], order[same + 1]]))
    sub = codes[crowd]
    sub_order = np.lexsort(sub.T[::-1])
    ordered = sub[sub_order]
    repeat = np.zeros(len(sub), bool)
    repeat[1:] = (ordered[1:] == ordered[:-1]).all(axis=1)
    drop = crowd[sub_order[repeat]]  # later copies: lexsort is stable, crowd is ascending
    keep = np.ones(len(codes), bool)
    keep[drop] = False
    return codes[keep]
