import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from worker.device.batcher import DynamicBatcher


def test_items_from_many_threads_are_grouped_into_full_batches():
    sizes: list[int] = []
    gate = threading.Event()

    def fn(items, info):
        gate.wait(5)  # hold the first batch so the rest pile up behind it
        sizes.append(info.size)
        return [i * 2 for i in items]

    batcher = DynamicBatcher(fn, max_batch=8, max_wait_s=0.05)
    with ThreadPoolExecutor(16) as pool:
        futures = list(pool.map(batcher.submit, range(33)))
    gate.set()
    assert [f.result(5) for f in futures] == [i * 2 for i in range(33)]
    batcher.close()
    assert sum(sizes) == 33
    assert max(sizes) == 8
    # the backlog that piled up behind the first batch goes out in full batches
    assert all(s == 8 for s in sizes[1:-1])
    assert len(sizes) <= 6


def test_a_lone_item_waits_at_most_max_wait():
    seen = []
    batcher = DynamicBatcher(
        lambda items, info: seen.append(info) or list(items), max_batch=64, max_wait_s=0.02
    )
    assert batcher.submit("a").result(2) == "a"
    batcher.close()
    assert seen[0].size == 1


def test_a_failing_item_fails_alone():
    def fn(items, info):
        if "bad" in items:
            raise ValueError("bad item")
        return [s.upper() for s in items]

    batcher = DynamicBatcher(fn, max_batch=4, max_wait_s=0.05)
    futures = [batcher.submit(s) for s in ["a", "bad", "c", "d"]]
    assert futures[0].result(2) == "A"
    with pytest.raises(ValueError, match="bad item"):
        futures[1].result(2)
    assert [f.result(2) for f in futures[2:]] == ["C", "D"]
    batcher.close()


def test_wrong_result_count_is_an_error_not_a_hang():
    batcher = DynamicBatcher(lambda items, info: [], max_batch=2, max_wait_s=0.0)
    with pytest.raises(RuntimeError, match="0 results"):
        batcher.submit(1).result(2)
    batcher.close()


def test_close_runs_what_is_queued():
    def slow(items, info):
        time.sleep(0.01)
        return list(items)

    batcher = DynamicBatcher(slow, max_batch=2, max_wait_s=0.0)
    futures = [batcher.submit(i) for i in range(10)]
    batcher.close(timeout=5)
    assert [f.result(0) for f in futures] == list(range(10))
    with pytest.raises(RuntimeError):
        batcher.submit(11)
