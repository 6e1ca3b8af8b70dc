import hashlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from modgate.errors import ErrorCode, ModerationError
from modgate.settings import S3Settings
from modgate.verdict import Source
from worker.ingest.fetch import (
    BackoffGate,
    Fetcher,
    GateTimeout,
    TargetError,
    TransientFetchError,
    is_transient,
)


def fetcher(cap=1000):
    return Fetcher(S3Settings(max_object_bytes=cap))


def src(path):
    return Source(kind="file", uri=str(path), path=str(path))


def code_of(f, source):
    with pytest.raises(ModerationError) as info:
        f.fetch(source)
    return info.value.code


def test_directories_expand_recursively_sorted_without_hidden(tmp_path):
    for rel in ["b.jpg", "a.jpg", "sub/c.png", "sub/deeper/d.gif", ".hidden.jpg", ".git/x.jpg"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    got = [os.path.relpath(s.path, tmp_path) for s in fetcher().expand(str(tmp_path))]
    assert got == ["a.jpg", "b.jpg", "sub/c.png", "sub/deeper/d.gif"]
    assert all(s.kind == "file" and s.uri == s.path for s in fetcher().expand(str(tmp_path)))


def test_a_missing_target_is_a_usage_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(fetcher().expand(str(tmp_path / "nope")))
    with pytest.raises(TargetError):
        Fetcher.parse_s3_uri("s3:///key")
    assert Fetcher.parse_s3_uri("s3://bucket/a/b/") == ("bucket", "a/b/")


def test_fetch_fills_in_size_and_content_hash(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"abc")
    fetched = fetcher().fetch(src(tmp_path / "a.jpg"))
    assert fetched.data == b"abc"
    assert fetched.source.size == 3 and fetched.source.sha256 == hashlib.sha256(b"abc").hexdigest()


def test_size_cap_boundary(tmp_path):
    (tmp_path / "ok").write_bytes(b"x" * 1000)
    (tmp_path / "big").write_bytes(b"x" * 1001)
    assert len(fetcher(1000).fetch(src(tmp_path / "ok")).data) == 1000
    assert code_of(fetcher(1000), src(tmp_path / "big")) == ErrorCode.TOO_LARGE


def test_file_error_codes(tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    assert code_of(fetcher(), src(tmp_path / "missing")) == ErrorCode.NOT_FOUND
    assert code_of(fetcher(), src(tmp_path / "empty")) == ErrorCode.EMPTY_OBJECT
    assert code_of(fetcher(), src(tmp_path)) == ErrorCode.FETCH_FAILED  # a directory


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file_is_access_denied(tmp_path):
    path = tmp_path / "secret.jpg"
    path.write_bytes(b"x")
    path.chmod(0)
    assert code_of(fetcher(), src(path)) == ErrorCode.ACCESS_DENIED


# -- S3: the process-wide backoff gate and modgate's own attempt count ------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Deadline:
    """What the fetcher reads of ``worker.pipeline.Cancel``."""

    def __init__(self, deadline=None, cancelled=False):
        self.deadline = deadline
        self._cancelled = cancelled

    @property
    def cancelled(self):
        return self._cancelled


def test_gate_backoff_grows_exponentially_with_jitter_up_to_the_cap():
    clock = Clock()
    gate = BackoffGate(base_s=1.0, max_s=4.0, clock=clock)
    assert gate.enter() == (0, False)  # open: everyone goes, nobody probes
    delays = []
    epoch, probe = gate.enter()
    for _ in range(5):
        delays.append(gate.failure(epoch, probe))
        clock.now = gate.open_at  # the delay is over: the next caller is the probe
        epoch, probe = gate.enter()
        assert probe
    bounds = [(0.5, 1.0), (1.0, 2.0), (2.0, 4.0), (2.0, 4.0), (2.0, 4.0)]
    assert all(lo <= d <= hi for d, (lo, hi) in zip(delays, bounds, strict=True)), delays
    gate.success(epoch, probe)
    assert not gate.closed and gate.enter()[1] is False


def test_failures_of_the_burst_in_flight_close_the_gate_once():
    clock = Clock()
    gate = BackoffGate(base_s=1.0, max_s=60.0, clock=clock)
    tickets = [gate.enter() for _ in range(30)]  # 30 requests in flight when S3 starts refusing
    for epoch, probe in tickets:
        gate.failure(epoch, probe)
    assert gate.failures == 1 and gate.open_at - clock.now <= 1.0
    # A late success of the old burst says nothing about S3 now: the gate stays closed.
    gate.success(*tickets[0])
    assert gate.closed


def test_one_probe_at_a_time_and_its_success_opens_the_gate_for_all():
    clock = Clock()
    gate = BackoffGate(base_s=1.0, max_s=60.0, clock=clock)
    gate.failure(*gate.enter())
    clock.now = gate.open_at
    epoch, probe = gate.enter()
    assert probe
    with pytest.raises(GateTimeout):  # a second caller waits for the probe, until cancelled
        gate.enter(Deadline(cancelled=True))
    released = []
    waiter = threading.Thread(target=lambda: released.append(gate.enter(Deadline(deadline=clock.now + 60))))
    waiter.start()
    gate.success(epoch, probe)
    waiter.join(10)
    assert released and released[0][1] is False and not gate.closed


def test_the_gate_never_waits_past_the_callers_deadline():
    clock = Clock()
    gate = BackoffGate(base_s=30.0, max_s=60.0, clock=clock)
    gate.failure(*gate.enter())
    with pytest.raises(GateTimeout, match="past the caller's deadline"):
        gate.enter(Deadline(deadline=clock.now + 5))  # reopens in 15-30 s: no point waiting


class FakeS3:
    """A stand-in for the GET client: answers ``plan`` in order (an exception to raise or
    bytes to return), then ``then`` forever; records how many calls were in flight when
    each refused one was made."""

    def __init__(self, plan, then=b"image-bytes", delay_s=0.0):
        self.plan = list(plan)
        self.then = then
        self.delay_s = delay_s
        self.calls = 0
        self.active = 0
        self.refused_alongside: list[int] = []
        self.lock = threading.Lock()

    def get_object(self, **kwargs):
        with self.lock:
            self.calls += 1
            self.active += 1
            outcome = self.plan.pop(0) if self.plan else self.then
            if isinstance(outcome, Exception):
                self.refused_alongside.append(self.active)
        try:
            time.sleep(self.delay_s)
            if isinstance(outcome, Exception):
                raise outcome
            return {"Body": FakeBody(outcome), "ETag": '"e"', "ContentLength": len(outcome)}
        finally:
            with self.lock:
                self.active -= 1


class FakeBody:
    def __init__(self, data):
        self.data = data

    def iter_chunks(self, size):
        yield self.data

    def close(self):
        pass


def client_error(status, code):
    from botocore.exceptions import ClientError

    response = {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(response, "GetObject")


def s3_fetcher(s3, max_attempts=5, base_s=0.001, max_s=0.05):
    f = Fetcher(S3Settings(max_attempts=max_attempts, backoff_base_s=base_s, backoff_max_s=max_s))
    f._get_client = s3
    return f


S3_SOURCE = Source(kind="s3", uri="s3://b/k.jpg", bucket="b", key="k.jpg")


def test_transient_s3_errors_are_retried_up_to_max_attempts_in_all():
    s3 = FakeS3([], then=client_error(503, "SlowDown"))
    with pytest.raises(TransientFetchError) as info:
        s3_fetcher(s3, max_attempts=4).fetch(S3_SOURCE)
    assert s3.calls == 4  # the first try included
    assert info.value.code == ErrorCode.FETCH_FAILED and "after 4 attempts" in info.value.message
    assert is_transient(info.value.code, info.value.message)


def test_s3_recovering_within_the_attempts_is_fetched():
    from botocore.exceptions import EndpointConnectionError

    plan = [
        client_error(503, "SlowDown"),
        EndpointConnectionError(endpoint_url="http://s3"),
        client_error(500, "InternalError"),
    ]
    s3 = FakeS3(plan)
    f = s3_fetcher(s3, max_attempts=4)
    assert f.fetch(S3_SOURCE).data == b"image-bytes"
    assert s3.calls == 4 and not f.gate.closed


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (client_error(404, "NoSuchKey"), ErrorCode.NOT_FOUND),
        (client_error(403, "AccessDenied"), ErrorCode.ACCESS_DENIED),
        (client_error(400, "InvalidObjectState"), ErrorCode.FETCH_FAILED),
    ],
)
def test_permanent_s3_errors_are_not_retried(error, code):
    s3 = FakeS3([error])
    f = s3_fetcher(s3)
    with pytest.raises(ModerationError) as info:
        f.fetch(S3_SOURCE)
    assert info.value.code == code and not is_transient(info.value.code, info.value.message)
    assert s3.calls == 1 and not f.gate.closed


def test_too_large_is_immediate_and_does_not_touch_the_gate():
    s3 = FakeS3([], then=b"x" * 2000)
    f = Fetcher(S3Settings(max_object_bytes=1000))
    f._get_client = s3
    with pytest.raises(ModerationError) as info:
        f.fetch(S3_SOURCE)
    assert info.value.code == ErrorCode.TOO_LARGE and s3.calls == 1 and not f.gate.closed


def test_during_an_outage_only_one_probe_at_a_time_reaches_s3():
    """The gate is closed (S3 refused a request); 20 fetch threads arrive. Until S3
    recovers, each request is a lone probe; after, all go: exactly one successful GET per
    key plus the refused probes, never a burst."""
    refused = 4
    s3 = FakeS3([client_error(503, "SlowDown")] * refused, delay_s=0.005)
    f = s3_fetcher(s3, max_attempts=refused + 1, base_s=0.01)
    f.gate.failure(*f.gate.enter())

    def fetch(i):
        return f.fetch(S3_SOURCE.model_copy(update={"key": f"k{i}"})).data

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(fetch, range(20)))
    assert results == [b"image-bytes"] * 20
    assert s3.calls == 20 + refused
    assert s3.refused_alongside == [1] * refused  # each refused request was alone


def test_a_fetch_waiting_for_s3_gives_up_when_its_message_is_out_of_time():
    s3 = FakeS3([])
    f = s3_fetcher(s3, base_s=30.0, max_s=30.0)
    f.gate.failure(*f.gate.enter())  # closed for 15-30 s
    with pytest.raises(TransientFetchError, match="after 0 attempt") as info:
        f.fetch(S3_SOURCE, cancel=Deadline(deadline=time.monotonic() + 1))
    assert s3.calls == 0 and is_transient(info.value.code, info.value.message)


def test_get_client_leaves_retries_to_modgate():
    f = Fetcher(S3Settings(region="us-east-1", max_attempts=3))
    assert f.get_client.meta.config.retries == {"mode": "standard", "total_max_attempts": 1}
    assert f.client.meta.config.retries == {"mode": "standard", "total_max_attempts": 3}
