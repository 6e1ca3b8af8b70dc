"""What ``Service.moderate`` does with a message that runs out of time (real Redis; the
pipeline is a stand-in that never finishes): back to the queue, counted only when its
items were stuck in the pipeline, and ``timeout`` verdicts once the retries are spent."""

import time
from concurrent.futures import Future
from contextlib import nullcontext

import pytest
import redis

from modgate import keys
from modgate.settings import load_settings
from tests.helpers import verdicts
from worker.pipeline import Cancelled
from worker.service.service import Requeue, Service


class Backlogged:
    """Every slot is taken by other messages: submit waits until the caller gives up."""

    def admission(self, cancel=None):
        return nullcontext(True)

    def submit(self, source, request_id=None, policy=None, cancel=None):
        while not cancel.cancelled:
            time.sleep(0.01)
        future = Future()
        future.set_exception(Cancelled("gave up waiting"))
        return future


class Stuck(Backlogged):
    """Admitted at once, never finished (a hanging fetch or decode)."""

    def submit(self, source, request_id=None, policy=None, cancel=None):
        return Future()


@pytest.fixture
def svc(redis_server):
    r = redis.Redis.from_url(redis_server.url)
    r.flushall()
    settings = load_settings(
        redis={"url": redis_server.url},
        worker={
            "message_timeout_s": 1.0,
            "visibility_timeout_s": 31,
            "timeout_retries": 1,
            "metrics_port": 0,
        },
        # No S3 here: error verdicts must not try to tag their objects (the default).
        policy={"errors": {"all": {"action": "none"}}},
    )
    return Service(settings, ["modgate"], schedule=lambda d, c: None, redis=r)


MESSAGE = ({"items": [{"bucket": "bkt", "key": "a.jpg"}, {"bucket": "bkt", "key": "b.jpg"}]},)


def test_a_message_late_because_of_a_backlog_goes_back_without_counting(svc):
    svc.pipeline = Backlogged()
    for _ in range(3):  # more than timeout_retries: none of them counted
        with pytest.raises(Requeue, match="waited for room"):
            svc.moderate("task-1", MESSAGE, {})
    assert svc.redis.get(keys.message_retries("task-1")) is None
    assert svc.redis.xlen(keys.VERDICT_STREAM) == 0


def test_a_stuck_message_is_requeued_then_finished_with_timeout_verdicts(svc):
    svc.pipeline = Stuck()
    with pytest.raises(Requeue, match="unfinished at the message timeout"):
        svc.moderate("task-2", MESSAGE, {})
    assert svc.redis.get(keys.message_retries("task-2")) == b"1"
    assert svc.redis.xlen(keys.VERDICT_STREAM) == 0  # a timeout is transient: nothing judged yet
    counts = svc.moderate("task-2", MESSAGE, {})  # retries spent
    assert counts["published"] == 2
    assert {v["source"]["key"]: v["error"]["code"] for v in verdicts(svc.redis)} == {
        "a.jpg": "timeout",
        "b.jpg": "timeout",
    }
    assert svc.redis.get(keys.message_retries("task-2")) is None


class LateTurn(Backlogged):
    """The turn to enter comes after longer than the message timeout (others were ahead);
    once in, each item takes 0.3 s."""

    def admission(self, cancel=None):
        time.sleep(1.5)
        return nullcontext(not cancel.cancelled)

    def submit(self, source, request_id=None, policy=None, cancel=None):
        from concurrent.futures import ThreadPoolExecutor

        from modgate.errors import ErrorCode
        from modgate.verdict import error_verdict

        verdict = error_verdict(source, policy.version, ErrorCode.NOT_FOUND, "no such key")
        return ThreadPoolExecutor(1).submit(lambda: (time.sleep(0.3), verdict)[1])


def test_the_message_timeout_starts_when_the_message_enters_the_pipeline(svc):
    """Waiting for the turn is backpressure, not work: a message admitted late still gets its
    whole timeout, instead of being cancelled half-way and its work wasted."""
    svc.pipeline = LateTurn()
    counts = svc.moderate("task-3", MESSAGE, {})
    assert counts["published"] == 2
    assert svc.redis.get(keys.message_retries("task-3")) is None
