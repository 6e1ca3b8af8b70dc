"""The PDQ bank index is exact: at 10⁵ hashes it returns precisely what a brute-force
popcount scan returns, for planted near-duplicates at every distance 0..31 (and not at 32),
across incremental adds, merges, removals, rebuilds and growth, on skewed (clustered)
hashes, in the half-merged states a chunk-by-chunk merge publishes, and for lookups that
run on other threads while the bank changes."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable

import numpy as np
import pytest

from worker.judge import bank_index
from worker.judge.bank_index import CHUNKS, MAX_RADIUS, PdqIndex, _probes, codes_to_hex, hex_to_codes


def random_codes(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 2**64, (n, 4), dtype=np.uint64)


def flip(code: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    out = code.copy()
    for bit in rng.choice(256, k, replace=False):
        out[bit // 64] ^= np.uint64(1) << np.uint64(63 - bit % 64)
    return out


def brute(codes: np.ndarray, query_hex: str, radius: int) -> list[tuple[str, int]]:
    dist = np.bitwise_count(codes ^ hex_to_codes([query_hex])[0]).sum(axis=1)
    hit = np.flatnonzero(dist <= radius)
    return sorted(zip(codes_to_hex(codes[hit]), dist[hit].tolist(), strict=True))


def test_hex_round_trip_is_threatexchanges_bit_order():
    # The hex is one big-endian 256-bit number: its first digit holds the highest bits.
    h = "8" + "0" * 63
    codes = hex_to_codes([h])
    assert codes[0, 0] == np.uint64(1 << 63) and not codes[0, 1:].any()
    assert codes_to_hex(codes) == [h]


def test_every_chunking_bound_is_exact():
    # Norouzi's pigeonhole with r = 11·s + a: chunks 0..a at radius s, the rest at s - 1.
    for radius in range(MAX_RADIUS + 1):
        s, a = divmod(radius, CHUNKS)
        radii = [s if j <= a else s - 1 for j in range(CHUNKS)]
        # A hash that differs by radii[j] + 1 bits in every chunk is at least radius + 1 away.
        assert sum(r + 1 for r in radii) == radius + 1
    _, flips = _probes(23, 31)
    assert len(flips) == 10 * (1 + 23 + 253) + (1 + 23)


@pytest.fixture(scope="module")
def bank_1e5():
    rng = np.random.default_rng(20240518)
    codes = random_codes(rng, 100_000)
    index = PdqIndex()
    index.add_codes(codes)
    return rng, codes, index


def test_exact_at_1e5_with_planted_near_duplicates(bank_1e5):
    rng, codes, index = bank_1e5
    assert len(index) == 100_000
    for distance in range(MAX_RADIUS + 2):
        for _ in range(4):
            source = codes[rng.integers(len(codes))]
            query = codes_to_hex(flip(source, distance, rng)[None])[0]
            found = sorted(index.search(query, 31))
            assert found == brute(codes, query, 31), distance
            source_hex = codes_to_hex(source[None])[0]
            # Planted at 0..31: found with its distance; at 32: not a match.
            assert ((source_hex, distance) in found) == (distance <= 31)


def flip_bits(code: np.ndarray, bits: list[int]) -> np.ndarray:
    out = code.copy()
    for bit in bits:  # bit 0 is the hex's first (highest) bit
        out[bit // 64] ^= np.uint64(1) << np.uint64(63 - bit % 64)
    return out


@pytest.mark.parametrize("radius", [31, 30, 22, 21, 12, 11, 10, 1, 0])
def test_worst_case_near_duplicates_are_found_through_each_chunk(bank_1e5, radius):
    """The hardest hashes for multi-index hashing: exactly at ``radius``, with one chunk at
    its search radius and every other chunk one bit beyond it, so only that chunk's probes
    can find them — once for each chunk."""
    rng, codes, index = bank_1e5
    s, a = divmod(radius, CHUNKS)
    radii = [s if j <= a else s - 1 for j in range(CHUNKS)]
    for only in range(CHUNKS):
        if radii[only] < 0:
            continue
        bits: list[int] = []
        for j in range(CHUNKS):
            flips = radii[j] if j == only else radii[j] + 1
            # Within the chunk's top 8 bits: every bucket key (the top p ≥ 8 bits of a
            # chunk) sees them, so no other chunk's bucket can stand in.
            bits += [23 * j + int(b) for b in rng.choice(8, flips, replace=False)]
        assert len(bits) == radius
        source = codes[rng.integers(len(codes))]
        query = codes_to_hex(flip_bits(source, bits)[None])[0]
        assert (codes_to_hex(source[None])[0], radius) in index.search(query, radius), (radius, only)
        # One more bit (outside every chunk) puts it out of reach.
        beyond = codes_to_hex(flip_bits(source, [*bits, 255])[None])[0]
        assert codes_to_hex(source[None])[0] not in dict(index.search(beyond, radius))


def test_exact_at_smaller_radii(bank_1e5):
    rng, codes, index = bank_1e5
    for radius in (0, 1, 5, 10, 11, 12, 21, 22, 23, 30):
        for distance in (radius - 1, radius, radius + 1):
            if distance < 0:
                continue
            query = codes_to_hex(flip(codes[rng.integers(len(codes))], distance, rng)[None])[0]
            assert sorted(index.search(query, radius)) == brute(codes, query, radius), (radius, distance)


def test_random_queries_match_nothing_like_brute_force(bank_1e5):
    rng, codes, index = bank_1e5
    for query in codes_to_hex(random_codes(rng, 50)):
        assert index.search(query, 31) == brute(codes, query, 31) == []


def test_skewed_hashes_many_in_one_bucket():
    """Real lists are not uniform: thousands of hashes sharing chunks (near copies of a few
    images) crowd a few buckets; still exact."""
    rng = np.random.default_rng(7)
    seeds = random_codes(rng, 20)
    codes = np.array([flip(seeds[i % 20], int(rng.integers(0, 40)), rng) for i in range(20_000)])
    index = PdqIndex()
    assert index.add_codes(codes) == len({tuple(r) for r in codes.tolist()})
    codes = hex_to_codes(index.hashes())
    for i in range(40):
        query = codes_to_hex(flip(seeds[i % 20], i % 33, rng)[None])[0]
        assert sorted(index.search(query, 31)) == brute(codes, query, 31)


def refuse_reservations(monkeypatch: pytest.MonkeyPatch) -> None:
    """An OS that will not reserve address space (strict overcommit): ordinary arrays, sized
    to fit, so the index outgrows them often."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("mmap refused")

    monkeypatch.setattr(bank_index.mmap, "mmap", refuse)


@pytest.mark.parametrize(
    ("delta_max", "room"),
    [(None, "reserved"), (64, "reserved"), (64, "small"), (64, "refused")],
)
def test_incremental_adds_and_removes_stay_exact(delta_max, room, monkeypatch):
    """Single adds, batches, merges of the delta (forced often with a small delta_max), a
    rebuild as the bank doubles, removals (dead rows leave the tables, their slots are
    reused), and — with little room reserved, or none — the slots and tables outgrowing
    their arrays."""
    if room == "small":
        monkeypatch.setattr(bank_index, "_RESERVE_ROWS", 256)
    elif room == "refused":
        refuse_reservations(monkeypatch)
    rng = np.random.default_rng(11)
    index = PdqIndex(delta_max=delta_max)
    stored: dict[str, None] = {}

    def check(n_queries: int = 30) -> None:
        codes = hex_to_codes(list(stored))
        assert len(index) == len(stored)
        for k in range(n_queries):
            src = codes[rng.integers(len(codes))]
            query = codes_to_hex(flip(src, k % 33, rng)[None])[0]
            assert sorted(index.search(query, 31)) == brute(codes, query, 31)

    for size in (3000, 1, 1, 500, 7000, 2, 9000):
        new = codes_to_hex(random_codes(rng, size))
        if size <= 2:
            for h in new:
                assert index.add([h]) == 1
        else:
            assert index.add(new) == size
        stored.update(dict.fromkeys(new))
        check(10)
    assert index.add(list(stored)[:100]) == 0  # already there: nothing new
    check()

    gone = list(stored)[::3]
    assert index.remove(gone[:10]) == 10
    for h in gone[:10]:
        assert h not in index and not any(hit == h for hit, _ in index.search(h, 31))
        stored.pop(h)
    check()  # dead rows still in the tables are not returned
    assert index.remove(gone) == len(gone) - 10  # the rest: enough dead rows to merge them out
    assert index.remove(gone[:5]) == 0
    for h in gone[10:]:
        stored.pop(h)
    check()
    assert set(index.hashes()) == set(stored)
    # A merge while the tables hold dead rows: they leave the tables, the rest stays exact.
    few = list(stored)[:50]
    assert index.remove(few) == 50
    for h in few:
        stored.pop(h)
    assert index._dead_tabled > 0
    more = codes_to_hex(random_codes(rng, 5000))
    index.add(more)
    stored.update(dict.fromkeys(more))
    assert index._dead_tabled == 0
    check()
    assert set(index.hashes()) == set(stored)
    # Added again after removal (into freed slots): found again.
    assert index.add(gone[:3]) == 3
    stored.update(dict.fromkeys(gone[:3]))
    assert index.search(gone[0], 0) == [(gone[0], 0)]
    # Shrunk to a few: the tables shrink (p falls); still exact.
    most = list(stored)[200:]
    assert index.remove(most) == len(most)
    for h in most:
        stored.pop(h)
    check()
    assert set(index.hashes()) == set(stored)


def test_every_half_merged_snapshot_is_exact():
    """A merge publishes a snapshot after each chunk it moves: lookups that read one (some
    chunks merged, others not) still return exactly the rows present before the merge —
    the delta's, the tables', not the removed ones, and none of a batch not yet added."""
    rng = np.random.default_rng(17)
    index = PdqIndex(delta_max=200)
    tabled = random_codes(rng, 3000)
    index.add_codes(tabled)
    # The delta: near-duplicates of tabled rows (so queries reach both), not merged yet.
    delta = np.array([flip(tabled[i], 1 + i % 31, rng) for i in range(150)])
    index.add_codes(delta)
    removed = tabled[:100]
    assert index.remove(codes_to_hex(removed)) == 100
    present = np.concatenate([tabled[100:], delta])
    batch = np.array([flip(tabled[i], 1 + i % 29, rng) for i in range(100, 400)])
    queries = [codes_to_hex(flip(tabled[i], i % 32, rng)[None])[0] for i in range(0, 400, 4)]
    states: list[int] = []
    drain = index._drain

    def check_then_drain() -> None:
        # Called before each chunk is written: the snapshot has the chunks before it merged.
        states.append(sum(1 for j in range(CHUNKS) if index._region[j] != j))
        for q in queries:
            assert sorted(index.search(q, 31)) == brute(present, q, 31)
        drain()

    index._drain = check_then_drain  # type: ignore[method-assign]
    index.add_codes(batch)  # more than the delta holds: merged, chunk by chunk, before it is published
    index._drain = drain  # type: ignore[method-assign]
    assert len(set(states)) > CHUNKS // 2  # snapshots with different numbers of chunks merged
    present = np.concatenate([present, batch])
    for q in queries:
        assert sorted(index.search(q, 31)) == brute(present, q, 31)


def counted(calls: dict[str, int], name: str, method: Callable[..., object]) -> Callable[..., object]:
    """``method``, counting its calls in ``calls[name]``."""

    def call(*args: object) -> object:
        calls[name] += 1
        return method(*args)

    return call


@pytest.fixture
def threads_switch_often():
    """Threads take turns every few µs, so lookups straddle every step of a merge."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(interval)


def test_lookups_on_other_threads_stay_exact_while_the_bank_changes(monkeypatch, threads_switch_often):
    """One thread adds and removes hashes (singles and batches; a merge every few calls,
    chunk by chunk; freed slots reused; slots outgrowing their room) while others look up
    stored hashes and near-duplicates: every hash present for the whole lookup is returned,
    at its distance; nothing else is, but hashes added or removed meanwhile, at theirs."""
    monkeypatch.setattr(bank_index, "_RESERVE_ROWS", 1024)
    rng = np.random.default_rng(23)
    index = PdqIndex(delta_max=64)
    stable = random_codes(rng, 2000)
    index.add_codes(stable[:1000])
    index.add_codes(stable[1000:])  # room for 2,000 rows: the churn outgrows it
    # Rows that come and go, many within the radius of the queries.
    churn = np.concatenate(
        [np.array([flip(stable[i % 40], 1 + i % 31, rng) for i in range(400)]), random_codes(rng, 600)]
    )
    queries = [flip(stable[i], i % 32, rng) for i in range(40)]
    every = np.concatenate([stable, churn])
    known = dict(zip(codes_to_hex(every), every, strict=True))
    expected = [brute(stable, codes_to_hex(q[None])[0], 31) for q in queries]
    errors: list[str] = []
    lookups = [0]
    done = threading.Event()

    def reader() -> None:
        try:
            read()
        except Exception as e:  # a lookup that reads garbage may also fail: that is an error too
            errors.append(repr(e))

    def read() -> None:
        while not done.is_set() and not errors:
            for q, want in zip(queries, expected, strict=True):
                got = index.search(codes_to_hex(q[None])[0], 31)
                lookups[0] += 1
                hashes = [h for h, _ in got]
                if len(set(hashes)) != len(hashes):
                    errors.append(f"repeated hits {got}")
                for h, d in got:
                    row = known.get(h)
                    if row is None or int(np.bitwise_count(row ^ q).sum()) != d:
                        errors.append(f"{h} at {d}: not a stored row at that distance")
                stable_hits = sorted((h, d) for h, d in got if h not in churn_hex)
                if stable_hits != want:
                    errors.append(f"stable rows {stable_hits} != brute force {want}")

    churn_hex = set(codes_to_hex(churn))
    calls = {"_merge_chunks": 0, "_rebuild": 0, "_grow_slots": 0}
    for name in calls:
        monkeypatch.setattr(index, name, counted(calls, name, getattr(index, name)))
    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    present = np.zeros(len(churn), bool)
    try:
        for step in range(300):
            size = (1, 7, 90)[step % 3]  # 90 > delta_max: merged before it is published
            pick = rng.choice(len(churn), size, replace=False)
            if step % 2:
                index.remove(codes_to_hex(churn[pick]))
                present[pick] = False
            else:
                index.add_codes(churn[pick])
                present[pick] = True
            if errors:
                break
    finally:
        done.set()
        for t in threads:
            t.join()
    assert errors == []
    assert calls["_merge_chunks"] > 20 and calls["_rebuild"] and calls["_grow_slots"], calls
    assert lookups[0] > 0
    final = np.concatenate([stable, churn[present]])
    assert len(index) == len(final)
    for q in queries:
        hex_q = codes_to_hex(q[None])[0]
        assert sorted(index.search(hex_q, 31)) == brute(final, hex_q, 31)


def test_radius_beyond_what_is_exact_is_refused():
    with pytest.raises(ValueError, match=r"radius must be 0\.\.31"):
        PdqIndex().search("0" * 64, 32)


def test_empty_index_and_duplicates_within_a_batch():
    index = PdqIndex()
    assert index.search("f" * 64, 31) == []
    assert index.add(["f" * 64, "f" * 64, "e" * 64]) == 2
    assert index.search("f" * 64, 31) == [("f" * 64, 0)]  # "e" * 64 is 64 bits away


def test_lookups_while_the_sync_thread_adds_and_merges():
    """Readers on other threads see a consistent snapshot during merges: every hit they get
    is a stored hash within the radius, and a hash stored before they started is found."""
    rng = np.random.default_rng(5)
    index = PdqIndex(delta_max=256)
    base = random_codes(rng, 20_000)
    index.add_codes(base)
    probes = [codes_to_hex(flip(base[i], 20, rng)[None])[0] for i in range(200)]
    wanted = codes_to_hex(base[:200])
    errors: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            for q, w in zip(probes, wanted, strict=True):
                try:
                    hits = dict(index.search(q, 31))
                except Exception as e:
                    errors.append(repr(e))
                    return
                if hits.get(w) != 20:
                    errors.append(f"{w} missing or at {hits.get(w)}")
                    return

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for _ in range(40):
        index.add_codes(random_codes(rng, 300))  # a merge every batch or so
    stop.set()
    for t in threads:
        t.join()
    assert errors == []
    assert len(index) == 20_000 + 40 * 300


def test_repeats_in_a_batch_are_dropped_even_among_rows_sharing_a_first_word():
    a = [1, 2, 3, 4]
    b = [1, 9, 9, 9]  # same first word as a, another hash
    c = [7, 7, 7, 7]
    codes = np.array([a, b, a, c, b, a], dtype=np.uint64)
    index = PdqIndex()
    assert index.add_codes(codes) == 3
    assert sorted(index.hashes()) == sorted(codes_to_hex(np.array([a, b, c], dtype=np.uint64)))


@pytest.mark.parametrize("delta_max", [None, 64])
def test_reconcile_brings_the_index_to_the_given_hashes_in_place(delta_max):
    """A bank loaded whole again: only the difference is written (rows in the tables, in
    the delta, dead ones), the result is exact, and a page that raises changes nothing."""
    rng = np.random.default_rng(5)
    index = PdqIndex(delta_max=delta_max)
    old = random_codes(rng, 3000)
    index.add_codes(old[:2500])
    index.add_codes(old[2500:])  # some still in the delta
    index.remove(codes_to_hex(old[:100]))  # dead rows
    new_rows = random_codes(rng, 700)
    wanted = np.concatenate([old[50:2000], old[2900:], new_rows])  # some dead ones come back
    pages = [wanted[i : i + 333] for i in range(0, len(wanted), 333)]
    before = index.hashes()

    def failing():
        yield pages[0]
        raise ValueError("a stored hash that is not one")

    with pytest.raises(ValueError):
        index.reconcile(failing())
    assert index.hashes() == before
    added, removed = index.reconcile(iter(pages))
    assert sorted(index.hashes()) == sorted(codes_to_hex(wanted)) and len(index) == len(wanted)
    assert added == 50 + 700  # old[50:100] were dead, new_rows are new
    assert removed == 900  # old[2000:2900]: alive, and not wanted
    for k in range(40):
        src = wanted[rng.integers(len(wanted))]
        query = codes_to_hex(flip(src, k % 33, rng)[None])[0]
        assert sorted(index.search(query, 31)) == brute(wanted, query, 31)
    assert index.reconcile(iter(pages)) == (0, 0)  # already equal: nothing written
