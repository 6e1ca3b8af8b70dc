"""The near-duplicate index beside the score cache (worker/judge/near_duplicates.py), in
memory and in a real redis-server: exact against brute force up to 8 bits, per context,
flat images never reused, and bounded by the cache's size and TTL."""

from __future__ import annotations

import random

import pytest
import redis

from modgate import keys
from modgate.settings import CacheSettings
from worker.judge.near_duplicates import MAX_BITS, MemoryNearIndex, RedisNearIndex, distance


def flip(pdq: str, bits: list[int]) -> str:
    value = int(pdq, 16)
    for b in bits:
        value ^= 1 << b
    return f"{value:064x}"


@pytest.fixture
def r(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    return client


@pytest.fixture(params=["memory", "redis"])
def make(request, r):
    def build(**settings):
        cache = CacheSettings(**settings)
        return MemoryNearIndex(cache) if request.param == "memory" else RedisNearIndex(r, cache)

    return build


def test_finds_exactly_what_brute_force_finds_within_the_threshold(make):
    rng = random.Random(7)
    index = make()
    stored = [f"{rng.getrandbits(256):064x}" for _ in range(300)]
    for i, pdq in enumerate(stored):
        index.add("ctx", pdq, 90, f"entry{i}")
    for trial in range(200):
        base = stored[trial % len(stored)]
        # Every distance 0..9 (9: beyond any allowed threshold), bits anywhere, the last
        # hex digit (in no chunk) included.
        query = flip(base, rng.sample(range(256), trial % 10))
        for max_bits in (0, 3, MAX_BITS):
            brute = sorted(
                (distance(query, h), i) for i, h in enumerate(stored) if distance(query, h) <= max_bits
            )
            found = index.find("ctx", query, 90, max_bits)
            if not brute:
                assert found is None
            else:
                assert found is not None and found[1] == brute[0][0]
                assert distance(query, stored[int(found[0][5:])]) == brute[0][0]


def test_contexts_are_apart_and_flat_images_are_never_reused(make):
    index = make()
    pdq = "ab" * 32
    index.add("policy-1", pdq, 90, "e1")
    index.add("policy-1", "cd" * 32, 30, "flat")  # quality < 50: not indexed
    assert index.find("policy-1", flip(pdq, [3]), 90, 4) == ("e1", 1)
    assert index.find("policy-2", pdq, 90, 4) is None  # another policy version
    assert index.find("policy-1", "cd" * 32, 90, 8) is None
    assert index.find("policy-1", pdq, 40, 8) is None  # a flat query
    assert index.find("policy-1", pdq, 90, MAX_BITS + 1) is None  # beyond what is exact


def test_bounded_by_max_entries_and_empty_buckets_go(make, r):
    index = make(max_entries=5)
    hashes = [f"{i:02x}" * 32 for i in range(1, 9)]
    for i, pdq in enumerate(hashes):
        index.add("ctx", pdq, 90, f"e{i}")
    assert [index.find("ctx", h, 90, 0) for h in hashes[:3]] == [None, None, None]
    assert index.find("ctx", hashes[-1], 90, 0) == ("e7", 0)
    if isinstance(index, RedisNearIndex):
        assert r.zcard(keys.NEAR_DUPLICATE_INDEX) == 5
        # 5 kept images × 9 chunks, every dropped member gone from its buckets.
        bucket_keys = list(r.scan_iter(keys.NEAR_DUPLICATE_PREFIX + "*"))
        assert sum(r.scard(k) for k in bucket_keys) == 5 * 9
        assert all(0 < r.ttl(k) <= CacheSettings().ttl_s for k in bucket_keys)


def test_redis_entries_older_than_the_ttl_are_dropped(r):
    index = RedisNearIndex(r, CacheSettings(ttl_s=60))
    index.add("ctx", "ab" * 32, 90, "old")
    r.zadd(keys.NEAR_DUPLICATE_INDEX, {"ctx " + "ab" * 32 + " old": 1})  # written long ago
    index.add("ctx", "cd" * 32, 90, "new")
    assert index.find("ctx", "ab" * 32, 90, 0) is None and index.find("ctx", "cd" * 32, 90, 0) == ("new", 0)


def test_redis_members_not_written_by_the_index_are_ignored_and_errors_are_no_reuse(r):
    index = RedisNearIndex(r, CacheSettings())
    pdq = "ab" * 32
    for bucket in ("0:" + pdq[:7], "1:" + pdq[7:14]):
        r.sadd(keys.near_duplicate_bucket("ctx", bucket), "garbage", "zz" * 32 + " e", pdq + " ")
    assert index.find("ctx", pdq, 90, 8) is None
    down = RedisNearIndex(redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2), CacheSettings())
    assert down.find("ctx", pdq, 90, 8) is None
    down.add("ctx", pdq, 90, "e")  # logged, not raised
