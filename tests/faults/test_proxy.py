"""The fault proxy itself, against a real receiver: it forwards and counts, and each fault
does what the scenarios rely on."""

from __future__ import annotations

import socket
import time

import pytest
import requests

from tests.faults.proxy import S3_SLOW_DOWN, Fault, FaultProxy
from tests.servers import WebhookReceiver


@pytest.fixture
def upstream():
    receiver = WebhookReceiver()
    yield receiver
    receiver.stop()


@pytest.fixture
def proxy(upstream):
    p = FaultProxy(upstream.url.rsplit("/", 1)[0])
    yield p
    p.stop()


def test_forwards_and_counts(proxy, upstream):
    with requests.Session() as session:  # keep-alive, as boto3 and the dispatcher use it
        for i in range(3):
            assert session.post(f"{proxy.url}/hook", data=f"body-{i}").status_code == 200
    assert [r["body"] for r in upstream.requests] == [b"body-0", b"body-1", b"body-2"]
    assert [(s.method, s.path, s.status) for s in proxy.seen()] == [("POST", "/hook", 200)] * 3


def test_a_burst_of_503_then_recovery(proxy, upstream):
    proxy.outage(0.5, Fault(status=503, body=S3_SLOW_DOWN), match=lambda m, p: p == "/hook")
    first = requests.post(f"{proxy.url}/hook", data=b"x")
    assert first.status_code == 503 and b"SlowDown" in first.content
    assert requests.post(f"{proxy.url}/other", data=b"x").status_code == 200  # not matched
    time.sleep(0.6)
    assert requests.post(f"{proxy.url}/hook", data=b"x").status_code == 200
    assert [s.status for s in proxy.seen()] == [503, 200, 200]
    assert [r["path"] for r in upstream.requests] == ["/other", "/hook"]  # the 503 never went up


def test_latency_and_reset(proxy):
    proxy.rule = lambda m, p: Fault(delay_s=0.3) if p == "/slow" else Fault(reset=True)
    started = time.monotonic()
    assert requests.post(f"{proxy.url}/slow", data=b"x").status_code == 200
    assert time.monotonic() - started >= 0.3
    with pytest.raises(requests.ConnectionError):
        requests.post(f"{proxy.url}/reset", data=b"x")


def test_slow_drip_keeps_a_reader_waiting(proxy, upstream):
    proxy.rule = lambda m, p: Fault(drip_s=0.02, endless=p == "/endless")
    # A finite drip arrives whole, slowly; a read timeout longer than one byte's gap never fires.
    started = time.monotonic()
    assert requests.post(f"{proxy.url}/hook", data=b"x", timeout=(2, 1)).status_code == 200
    assert time.monotonic() - started > 1.0
    with socket.create_connection((proxy.host, proxy.port), timeout=2) as sock:
        sock.sendall(b"POST /endless HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx")
        received = b""
        until = time.monotonic() + 2.0
        while time.monotonic() < until:
            received += sock.recv(64)
    assert received.startswith(b"HTTP/1.1 200") and b"\r\n\r\n" not in received
    assert len(upstream.requests) == 2  # forwarded, then the answer was held back
