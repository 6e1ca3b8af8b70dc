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

Layout (one index per bank): ``codes`` (rows of 4 native uint64, the big-endian words of
the hash), and per chunk the row ids sorted by the chunk's top ``p`` bits, with bucket
offsets — one array for all chunks so a lookup is a dozen numpy calls. ``p`` grows with
the bank (about log2 of its rows, at most 23), so a bucket holds about one row; at 10⁷
hashes that is ~1.1 GB.

Updates are incremental: new rows go to a small ``delta`` that lookups scan by brute force
and that is merged into the sorted tables (one linear pass, no re-sort of the main part)
when it would outgrow ``delta_max`` (a batch that large is merged before it is published,
so lookups never scan a large delta); removed rows are marked dead at once and dropped from the
tables by the next merge; only when the bank doubles (``p`` changes) or half its rows are
dead are the tables rebuilt. Writers (one thread: the bank sync) build new arrays and
publish them as one snapshot; lookups from any thread read whichever snapshot was current
when they started, so they never wait for a merge.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import lru_cache
from itertools import combinations

import faiss
import numpy as np

BITS = 256
CHUNKS = 11
CHUNK_BITS = 23
MAX_RADIUS = 31  # what the chunking above is exact for (up to 32), and PDQ's usual threshold
_CHUNK_MASK = (1 << CHUNK_BITS) - 1
_SHIFTS = tuple(BITS - CHUNK_BITS * (j + 1) for j in range(CHUNKS))
_ROW = np.dtype((np.void, 32))
_MIN_P, _MAX_P = 8, CHUNK_BITS


def hex_to_codes(hexes: list[str] | tuple[str, ...]) -> np.ndarray:
    """64-hex-digit hashes (already validated) → (n, 4) native uint64 rows."""
    if not hexes:
        return np.empty((0, 4), np.uint64)
    raw = bytes.fromhex("".join(hexes))
    return np.frombuffer(raw, dtype=">u8").reshape(-1, 4).astype(np.uint64)


def codes_to_hex(rows: np.ndarray) -> list[str]:
    data = np.ascontiguousarray(rows, dtype=np.uint64).astype(">u8").tobytes()
    return [data[i : i + 32].hex() for i in range(0, len(data), 32)]


def _chunk_key(codes: np.ndarray, j: int, p: int) -> np.ndarray:
    """(n, 4) rows → the bucket key of chunk ``j``: the top ``p`` bits of its 23 bits."""
    word, off = divmod(CHUNK_BITS * j, 64)
    if off + CHUNK_BITS <= 64:
        v = (codes[:, word] >> np.uint64(64 - off - CHUNK_BITS)) & np.uint64(_CHUNK_MASK)
    else:
        hi = 64 - off
        lo = CHUNK_BITS - hi
        v = ((codes[:, word] & np.uint64((1 << hi) - 1)) << np.uint64(lo)) | (
            codes[:, word + 1] >> np.uint64(64 - lo)
        )
    return (v >> np.uint64(CHUNK_BITS - p)).astype(np.uint32)


def _chunk_keys(codes: np.ndarray, p: int) -> np.ndarray:
    """(n, 4) rows → (n, CHUNKS) bucket keys."""
    out = np.empty((codes.shape[0], CHUNKS), np.uint32)
    for j in range(CHUNKS):
        out[:, j] = _chunk_key(codes, j, p)
    return out


@lru_cache(maxsize=256)
def _probes(p: int, radius: int) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    """The buckets to look up for a query at ``radius``: ((each chunk's offset in the
    bucket space, the chunk of each probe), the bits each probe flips in its chunk's key)."""
    s, a = divmod(radius, CHUNKS)
    chunk_of: list[int] = []
    flips: list[int] = []
    for j in range(CHUNKS):
        r = s if j <= a else s - 1
        for k in range(r + 1):
            for bits in combinations(range(p), k):
                chunk_of.append(j)
                flips.append(sum(1 << b for b in bits))
    base = np.arange(CHUNKS, dtype=np.intp) << p
    return (base, np.array(chunk_of, np.intp)), np.array(flips, np.intp)


def _choose_p(rows: int) -> int:
    return int(min(_MAX_P, max(_MIN_P, int(rows - 1).bit_length() if rows > 1 else 0)))


def _expand(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ranges [start, start + length) as one array of positions."""
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    if total == 0:
        return np.empty(0, np.int64)
    return np.arange(total, dtype=np.int64) + np.repeat(starts - (ends - lengths), lengths)


@dataclass(frozen=True)
class _Snapshot:
    """Everything a lookup reads, published at once. Rows of ``codes``/``alive`` past
    ``delta_end`` may be written later (new rows); nothing this snapshot names is."""

    p: int
    codes: np.ndarray  # (capacity, 4) uint64
    rows: np.ndarray  # the same memory, one 32-byte item per row
    alive: np.ndarray  # (capacity,) bool; cleared in place on removal
    starts: np.ndarray  # (CHUNKS << p,) uint32 — positions into ``ids``
    ends: np.ndarray
    ids: np.ndarray  # (CHUNKS × tabled rows,) uint32, grouped by chunk then bucket
    delta_start: int  # rows [delta_start, delta_end) are not in the tables yet
    delta_end: int


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
        self._lock = threading.Lock()  # one writer at a time; readers never take it
        self._delta_max = delta_max
        self._count = 0  # live rows
        self._tabled = 0  # rows per chunk in the tables (live or dead)
        self._dead_tabled = 0  # of those, removed since the tables were built
        self._delta_rows: dict[bytes, int] = {}  # row bytes → id, for the rows in the delta
        codes = np.zeros((0, 4), np.uint64)
        self._snap = _Snapshot(
            p=_MIN_P,
            codes=codes,
            rows=codes.view(_ROW).reshape(-1),
            alive=np.zeros(0, bool),
            starts=np.zeros(CHUNKS << _MIN_P, np.uint32),
            ends=np.zeros(CHUNKS << _MIN_P, np.uint32),
            ids=np.zeros(0, np.uint32),
            delta_start=0,
            delta_end=0,
        )

    def __len__(self) -> int:
        return self._count

    # ----------------------------------------------------------------- lookups

    def search(self, hex_hash: str, radius: int) -> list[tuple[str, int]]:
        """Every stored hash within ``radius`` bits of ``hex_hash``: (hex, distance)."""
        if not 0 <= radius <= MAX_RADIUS:
            raise ValueError(f"radius must be 0..{MAX_RADIUS}, not {radius}")
        snap = self._snap
        raw = bytes.fromhex(hex_hash)
        words = np.frombuffer(raw, ">u8").astype(np.uint64)
        found: list[np.ndarray] = []
        dists: list[np.ndarray] = []
        if len(snap.ids):
            chunk_base, flips = _probes(snap.p, radius)
            value = int.from_bytes(raw, "big")
            shift = CHUNK_BITS - snap.p
            keys = np.array([((value >> s) & _CHUNK_MASK) >> shift for s in _SHIFTS], np.intp)
            buckets = (keys | chunk_base[0])[chunk_base[1]] ^ flips
            starts = snap.starts[buckets].astype(np.intp)
            cand = snap.ids[_expand(starts, snap.ends[buckets] - starts)]
            if len(cand):
                dist = _hamming(words, np.take(snap.rows, cand))
                hit = np.flatnonzero(dist <= radius)
                if len(hit):
                    found.append(cand[hit].astype(np.int64))
                    dists.append(dist[hit])
        if snap.delta_end > snap.delta_start:
            # The delta is a contiguous block of rows: no gather, one popcount pass.
            dist = _hamming(words, snap.codes[snap.delta_start : snap.delta_end])
            hit = np.flatnonzero(dist <= radius)
            if len(hit):
                found.append(hit + snap.delta_start)
                dists.append(dist[hit])
        if not found:
            return []
        # Few hits: plain Python is cheaper than more numpy calls. A row is found once per
        # chunk that led to it; removed rows are dropped.
        nearest: dict[int, int] = {}
        for ids, ds in zip(found, dists, strict=True):
            for i, d in zip(ids.tolist(), ds.tolist(), strict=True):
                if i not in nearest and snap.alive[i]:
                    nearest[i] = d
        return [(snap.codes[i].astype(">u8").tobytes().hex(), d) for i, d in nearest.items()]

    def __contains__(self, hex_hash: str) -> bool:
        return bool(self._find(hex_to_codes([hex_hash]))[0] >= 0)

    def hashes(self) -> list[str]:
        snap = self._snap
        live = np.flatnonzero(snap.alive[: snap.delta_end])
        return codes_to_hex(snap.codes[live])

    def memory_bytes(self) -> int:
        """Bytes held by the arrays of the current snapshot (capacity included) and the
        delta's lookup table."""
        s = self._snap
        arrays = (s.codes, s.alive, s.starts, s.ids)
        # starts and ends are views of one offsets array (one entry more than either).
        return sum(a.nbytes for a in arrays) + 4 + len(self._delta_rows) * 120

    # ----------------------------------------------------------------- updates

    def add(self, hexes: list[str] | tuple[str, ...]) -> int:
        """Add hashes (64 lowercase hex digits each); returns how many were new."""
        return self.add_codes(hex_to_codes(list(hexes)))

    def remove(self, hexes: list[str] | tuple[str, ...]) -> int:
        """Remove hashes; returns how many were present. Takes effect for lookups at once."""
        codes = hex_to_codes(list(hexes))
        with self._lock:
            snap = self._snap
            ids = self._find(codes)
            ids = np.unique(ids[ids >= 0])
            if len(ids) == 0:
                return 0
            snap.alive[ids] = False
            self._count -= len(ids)
            for i in ids.tolist():
                if i >= snap.delta_start:
                    self._delta_rows.pop(snap.rows[i].tobytes(), None)
            self._dead_tabled += int(np.count_nonzero(ids < snap.delta_start))
            dead = snap.delta_end - self._count
            if dead > max(1024, snap.delta_end // 2):
                self._rebuild(snap.delta_end)
            return len(ids)

    def add_codes(self, codes: np.ndarray) -> int:
        """Add hashes given as (n, 4) native uint64 rows; returns how many were new."""
        if len(codes) == 0:
            return 0
        with self._lock:
            codes = _unique_rows(np.ascontiguousarray(codes, dtype=np.uint64))
            codes = codes[self._find(codes) < 0]
            n = len(codes)
            if n == 0:
                return 0
            snap = self._ensure_capacity(self._snap.delta_end + n)
            first, end = snap.delta_end, snap.delta_end + n
            snap.codes[first:end] = codes
            snap.alive[first:end] = True
            self._count += n
            if end - snap.delta_start <= self._delta_limit(self._tabled):
                for i, row in enumerate(snap.rows[first:end], first):
                    self._delta_rows[row.tobytes()] = i
                self._publish(snap, delta_end=end)
            elif _choose_p(end) != snap.p or self._tabled == 0:
                self._rebuild(end)  # the bank doubled (or has no tables yet): new bucket size
            else:
                # Merged before they are published: lookups never scan a large delta.
                self._merge(end)
            return n

    def _delta_limit(self, tabled: int) -> int:
        if self._delta_max is not None:
            return self._delta_max
        # A lookup scans the delta (~10 µs per 10,000 rows); a merge is a pass over the
        # tables (~0.5 s at 10⁷). Between 4 k and 32 k rows keeps both small.
        return int(min(32768, max(4096, tabled // 512)))

    def _ensure_capacity(self, rows: int) -> _Snapshot:
        snap = self._snap
        if rows <= len(snap.alive):
            return snap
        # Grows by a quarter: amortised O(1) per row, and little slack at 10⁷ rows.
        capacity = max(rows, int(len(snap.alive) * 1.25), 1024)
        codes = np.zeros((capacity, 4), np.uint64)
        codes[: snap.delta_end] = snap.codes[: snap.delta_end]
        alive = np.zeros(capacity, bool)
        alive[: snap.delta_end] = snap.alive[: snap.delta_end]
        return self._publish(snap, codes=codes, rows=codes.view(_ROW).reshape(-1), alive=alive)

    def _publish(self, snap: _Snapshot, **changes: object) -> _Snapshot:
        fields = {f: getattr(snap, f) for f in snap.__dataclass_fields__}
        fields.update(changes)
        self._snap = _Snapshot(**fields)  # type: ignore[arg-type]
        return self._snap

    def _find(self, codes: np.ndarray) -> np.ndarray:
        """Row id of each code that is stored and alive, else -1 (exact match)."""
        snap = self._snap
        found = np.full(len(codes), -1, np.int64)
        if len(codes) == 0:
            return found
        if self._delta_rows:
            for k, row in enumerate(codes.view(_ROW).reshape(-1)):
                i = self._delta_rows.get(row.tobytes())
                if i is not None and snap.alive[i]:
                    found[k] = i
        if len(snap.ids) == 0:
            return found
        buckets = _chunk_keys(codes, snap.p)[:, 0].astype(np.intp)
        starts = snap.starts[buckets].astype(np.int64)
        lengths = (snap.ends[buckets] - starts).astype(np.int64)
        positions = _expand(starts, lengths)
        owner = np.repeat(np.arange(len(codes)), lengths)
        cand = snap.ids[positions]
        same = (snap.codes[cand] == codes[owner]).all(axis=1) & snap.alive[cand]
        found[owner[same]] = cand[same]
        return found

    def _tables(self, p: int, n: int, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sorted ids and bucket offsets for rows 0..n-1, built from scratch (one chunk's
        keys at a time, to keep the extra memory small)."""
        buckets = 1 << p
        ids = np.empty(CHUNKS * n, np.uint32)
        offsets = np.empty((CHUNKS << p) + 1, np.uint32)
        offsets[0] = 0
        for j in range(CHUNKS):
            keys = _chunk_key(codes[:n], j, p)
            ids[j * n : (j + 1) * n] = np.argsort(keys, kind="stable")
            ends = offsets[j * buckets + 1 : (j + 1) * buckets + 1]
            np.cumsum(np.bincount(keys, minlength=buckets).astype(np.uint32), out=ends)
            ends += np.uint32(j * n)
        return ids, offsets

    def _rebuild(self, end: int) -> None:
        """Tables from every live row below ``end`` (bank doubled, or half its rows dead),
        compacting the rows when some are dead."""
        snap = self._snap
        live = np.flatnonzero(snap.alive[:end])
        n = len(live)
        if n == end:
            codes, alive = snap.codes, snap.alive  # nothing dead: no copy
        else:
            codes = np.zeros((max(1024, int(n * 1.25)), 4), np.uint64)
            np.take(snap.codes, live, axis=0, out=codes[:n])
            alive = np.zeros(len(codes), bool)
            alive[:n] = True
        p = _choose_p(n)
        ids, offsets = self._tables(p, n, codes)
        self._delta_rows = {}
        self._tabled = n
        self._dead_tabled = 0
        self._snap = _Snapshot(
            p=p,
            codes=codes,
            rows=codes.view(_ROW).reshape(-1),
            alive=alive,
            starts=offsets[:-1],
            ends=offsets[1:],
            ids=ids,
            delta_start=n,
            delta_end=n,
        )

    def _merge(self, end: int) -> None:
        """Move the delta into the tables in one linear pass per chunk (the tables are not
        sorted again), dropping dead rows from them on the way. Extra memory while it runs:
        the new tables (the old ones serve lookups until the new ones are published)."""
        snap = self._snap
        p, buckets = snap.p, 1 << snap.p
        old_n = self._tabled
        delta = np.arange(snap.delta_start, end, dtype=np.uint32)
        delta = delta[snap.alive[delta]]
        keys = _chunk_keys(snap.codes[delta], p)
        dead = self._dead_tabled > 0
        live_n = int(np.count_nonzero(snap.alive[snap.ids[:old_n]])) if dead else old_n
        n = live_n + len(delta)
        ids = np.empty(CHUNKS * n, np.uint32)
        offsets = np.empty((CHUNKS << p) + 1, np.uint32)
        offsets[0] = 0
        ranks = np.arange(len(delta), dtype=np.int64)
        for j in range(CHUNKS):
            part = snap.ids[j * old_n : (j + 1) * old_n]
            # Where each bucket of this chunk ends, counted from the chunk's start.
            ends = snap.ends[j * buckets : (j + 1) * buckets] - np.uint32(j * old_n)
            if dead:
                live = snap.alive[part]
                part = part[live]
                kept = np.zeros(old_n + 1, np.uint32)
                np.cumsum(live, out=kept[1:])
                ends = kept[ends]
            order = np.argsort(keys[:, j], kind="stable")
            sorted_keys = keys[order, j]
            # A delta row in bucket b lands after the bucket's tabled rows and the delta
            # rows of buckets ≤ b sorted before it: at ends[b] + its rank.
            dest = ends[sorted_keys].astype(np.int64) + ranks
            is_delta = np.zeros(n, bool)
            is_delta[dest] = True
            out = ids[j * n : (j + 1) * n]
            out[dest] = delta[order]
            out[~is_delta] = part
            new_ends = offsets[j * buckets + 1 : (j + 1) * buckets + 1]
            np.cumsum(np.bincount(sorted_keys, minlength=buckets).astype(np.uint32), out=new_ends)
            new_ends += ends
            new_ends += np.uint32(j * n)
        self._delta_rows = {}
        self._tabled = n
        self._dead_tabled = 0
        self._publish(snap, starts=offsets[:-1], ends=offsets[1:], ids=ids, delta_start=end, delta_end=end)


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
