"""The score cache: repeated bytes reuse the first run's detector scores (the real pipeline
and the real Open-NSFW model, counted), in memory for scan and in a real Redis for the
worker, bounded by count and time."""

import json
import shutil
import time
from dataclasses import replace

import pytest
import redis
from PIL import Image
from threatexchange.signal_type.pdq.pdq_hasher import pdq_from_file

from modgate import keys
from modgate.policy import Policy
from modgate.settings import CacheSettings, load_settings
from modgate.verdict import DetectorResult, ImageInfo, Source
from worker.detectors import LoadedDetectors
from worker.detectors.open_nsfw import OpenNSFW
from worker.judge.score_cache import CachedScores, MemoryScoreCache, RedisScoreCache
from worker.pipeline import Pipeline
from worker.tools.samples import photo


class Counting(OpenNSFW):
    """The real Open-NSFW model, counting the frames it scores."""

    frames_scored = 0

    def infer(self, inputs):
        Counting.frames_scored += len(inputs)
        return super().infer(inputs)


@pytest.fixture(scope="module")
def settings():
    return load_settings(batch={"max_batch": 4, "max_wait_ms": 5})


@pytest.fixture(scope="module")
def model(settings):
    loaded = OpenNSFW.load(settings)
    counting = Counting.__new__(Counting)
    counting.__dict__.update(loaded.__dict__)
    return counting


def _file(path):
    return Source(kind="file", uri=str(path), path=str(path))


def _run(pipe, paths, policy=None):
    return [pipe.submit(_file(p), policy=policy).result(timeout=60) for p in paths]


def test_the_same_bytes_under_two_names_are_scored_once(tmp_path, settings, model):
    first = tmp_path / "a.jpg"
    photo(320, 240, 7).save(first, "JPEG")
    second = shutil.copy(first, tmp_path / "b.jpg")
    other = tmp_path / "c.jpg"
    photo(320, 240, 8).save(other, "JPEG")
    Counting.frames_scored = 0
    with Pipeline(settings, LoadedDetectors([model], {}), cache=MemoryScoreCache(settings.cache)) as pipe:
        a, b, c = _run(pipe, [first, second, other])
        assert Counting.frames_scored == 2  # a and c; b reused a's scores
        assert a.cached_from is None and c.cached_from is None and b.cached_from == a.id
        # Its own verdict for its own source (a local file is named by its bytes, so the id is
        # the same; an S3 object's is not).
        assert b.source.path == str(second) and b.source.sha256 == a.source.sha256
        assert b.detectors == a.detectors and b.decision == a.decision and b.hashes == a.hashes
        # Another policy version: scores are keyed by it, so the models run again.
        bumped = Policy.model_validate({**settings.policy.model_dump(), "version": "other"})
        (again,) = _run(pipe, [second], policy=bumped)
        assert Counting.frames_scored == 3 and again.cached_from is None
    Counting.frames_scored = 0
    with Pipeline(settings, LoadedDetectors([model], {})) as pipe:  # no cache
        _run(pipe, [first, second])
    assert Counting.frames_scored == 2


def test_a_repeat_of_a_rotated_file_keeps_its_pdq_file(tmp_path, settings, model):
    """The file's own PDQ (ThreatExchange's, of an EXIF-rotated JPEG) is cached with the
    frames' PDQs: a repeat's verdict carries it too."""
    exif = Image.Exif()
    exif[0x0112] = 8
    first = tmp_path / "a.jpg"
    photo(320, 240, 9).save(first, "JPEG", exif=exif.tobytes())
    second = shutil.copy(first, tmp_path / "b.jpg")
    with Pipeline(settings, LoadedDetectors([model], {}), cache=MemoryScoreCache(settings.cache)) as pipe:
        a, b = _run(pipe, [first, second])
    assert b.cached_from == a.id
    assert a.hashes.pdq_file == pdq_from_file(first)[0] and b.hashes == a.hashes


def test_an_entry_written_before_pdq_file_still_loads():
    entry = json.loads(_entry(1).to_json())
    del entry["pdq_file"]
    old = CachedScores.from_json(json.dumps(entry))
    assert old.pdq_file is None and old.frame_pdqs == _entry(1).frame_pdqs
    upright = CachedScores.from_json(replace(_entry(1), pdq_file=None).to_json())
    assert upright.pdq_file is None


def _entry(n: int) -> CachedScores:
    return CachedScores(
        verdict_id=f"v{n}",
        detectors={"open_nsfw": DetectorResult(model="m", revision="r", scores={"nsfw": n / 10})},
        image=ImageInfo(format="JPEG", width=10, height=10, frame_count=1),
        frames=1,
        frame_pdqs=(("ab" * 32, 90),),
        pdq_file=("cd" * 32, 88),
    )


def test_the_redis_cache_round_trips_and_stays_bounded(redis_server):
    r = redis.Redis.from_url(redis_server.url)
    r.flushall()
    cache = RedisScoreCache(r, CacheSettings(max_entries=3, ttl_s=60))
    for n in range(5):
        cache.put(f"k{n}", _entry(n))
    assert cache.get("k4") == _entry(4)
    assert cache.get("k0") is None and cache.get("k1") is None  # the oldest went
    assert r.zcard(keys.SCORE_CACHE_INDEX) == 3
    assert 0 < r.ttl(keys.score_cache("k4")) <= 60
    r.set(keys.score_cache("k3"), b"{not json")
    assert cache.get("k3") is None  # an entry written by hand is a miss, not a failed image
    # Hashes from Redis feed the banks: an entry whose PDQ is not one is a miss too.
    for bad in (["AB" * 32, 90], ["ab" * 31, 90], ["ab" * 32, "90"], ["ab" * 32, 101]):
        entry = json.loads(_entry(2).to_json())
        entry["frame_pdqs"] = [bad]
        r.set(keys.score_cache("k4"), json.dumps(entry))
        assert cache.get("k4") is None, bad
    broken = RedisScoreCache(redis.Redis(port=1, socket_connect_timeout=0.2), CacheSettings())
    assert broken.get("k4") is None
    broken.put("k4", _entry(4))  # a Redis outage costs the cache, never the verdict


def test_the_memory_cache_expires_and_evicts():
    cache = MemoryScoreCache(CacheSettings(max_entries=2, ttl_s=1))
    cache.put("a", _entry(1))
    cache.put("b", _entry(2))
    assert cache.get("a") == _entry(1)  # a is now the most recent
    cache.put("c", _entry(3))
    assert cache.get("b") is None and cache.get("a") is not None
    time.sleep(1.1)
    assert cache.get("a") is None


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_near_duplicates_reuse_scores_only_when_turned_on(tmp_path, model, redis_server, backend):
    original = tmp_path / "a.png"
    photo(480, 360, 11).save(original, "PNG")
    with Image.open(original) as im:
        im.save(tmp_path / "b.jpg", "JPEG", quality=80)  # a re-encode: other bytes, PDQ a few bits off
    unrelated = tmp_path / "c.png"
    photo(480, 360, 12).save(unrelated, "PNG")
    paths = [original, tmp_path / "b.jpg", unrelated]

    def cache_for(settings):
        if backend == "memory":
            return MemoryScoreCache(settings.cache)
        client = redis.Redis.from_url(redis_server.url)
        client.flushall()
        return RedisScoreCache(client, settings.cache)

    on = load_settings(batch={"max_batch": 4, "max_wait_ms": 5}, cache={"near_duplicate_bits": 8})
    Counting.frames_scored = 0
    with Pipeline(on, LoadedDetectors([model], {}), cache=cache_for(on)) as pipe:
        a, b, c = _run(pipe, paths)
    assert Counting.frames_scored == 2  # a and c; b reused a's scores
    assert b.cached_from == a.id and c.cached_from is None
    assert b.detectors == a.detectors and b.hashes.md5 != a.hashes.md5 and b.hashes.pdq != a.hashes.pdq
    assert b.image.format == "JPEG"  # its own image, its own hashes

    off = load_settings(batch={"max_batch": 4, "max_wait_ms": 5})  # the default
    Counting.frames_scored = 0
    with Pipeline(off, LoadedDetectors([model], {}), cache=cache_for(off)) as pipe:
        _, b_off, _ = _run(pipe, paths)
    assert Counting.frames_scored == 3 and b_off.cached_from is None
