"""The review console as deployed, for its tests: real redis-server, moto over HTTP for S3,
the app served by uvicorn on a free port (a thread of the test process), verdicts put on
the stream the way the publisher writes them, with the publish-time record beside them."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import requests
import uvicorn

from modgate import keys
from modgate.settings import Settings, load_settings
from modgate.verdict import CategoryResult, DetectorResult, Source, Verdict, verdict_id
from tests.servers import free_port

TOKENS = {"ana": "ana-token-0123456789abcdef", "ben": "ben-token-0123456789abcdef"}
WEBHOOK_SECRET = "whsec-console-test-4711"


class ConsoleServer:
    """``create_app(settings)`` under uvicorn in a thread; ``stop`` shuts it down."""

    def __init__(self, settings: Settings, **app_kw: Any) -> None:
        from console.app import create_app

        self.settings = settings
        self.app = create_app(settings, **app_kw)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the console did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def console_settings(redis_url: str, s3_url: str, **console: Any) -> Settings:
    return load_settings(
        redis={"url": redis_url},
        s3={"endpoint_url": s3_url, "region": "us-east-1"},
        console={"tokens": TOKENS, "cookie_secure": False, "poll_s": 0.2, **console},
        webhook={"secret": WEBHOOK_SECRET, "allow_hosts": ["127.0.0.1"], "backoff_base_s": 0.2},
    )


@pytest.fixture
def r(redis_server) -> redis.Redis:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    return client


@pytest.fixture
def start_console(redis_server, moto_server, s3_env, r) -> Iterator[Any]:
    started: list[ConsoleServer] = []

    def start(**console: Any) -> ConsoleServer:
        server = ConsoleServer(console_settings(redis_server.url, moto_server.url, **console))
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def png(width: int = 64, height: int = 48, seed: int = 1) -> bytes:
    from PIL import Image

    image = Image.new("RGB", (width, height), ((seed * 40) % 256, 120, 200))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def publish(
    r: redis.Redis,
    bucket: str,
    key: str,
    *,
    decision: str | None = "review",
    score: float = 0.6,
    category: str = "sexual",
    status: str = "ok",
    tenant: str | None = None,
    urls: list[str] | None = None,
    policy: str = "p1",
) -> tuple[Verdict, str]:
    """One stream entry as the publisher writes it (fields verdict, id, status, decision) and
    the record the worker keeps beside it (keys.verdict_meta)."""
    source = Source(kind="s3", uri=f"s3://{bucket}/{key}", bucket=bucket, key=key)
    verdict = Verdict(
        id=verdict_id(source, policy),
        source=source,
        status=status,
        decision=decision,
        primary_category=category if decision in ("review", "unsafe") else None,
        categories={
            category: CategoryResult(
                score=score,
                flagged=decision == "unsafe",
                review=decision == "review",
                covered=True,
                drivers=["open_nsfw.nsfw"],
            ),
            ("hate" if category == "violence" else "violence"): CategoryResult(
                score=0.01, flagged=False, covered=True
            ),
        },
        detectors={"open_nsfw": DetectorResult(model="open_nsfw", revision="r1", scores={"nsfw": score})},
        policy_version=policy,
    )
    entry = r.xadd(
        keys.VERDICT_STREAM,
        {
            "verdict": verdict.model_dump_json(),
            "id": verdict.id,
            "status": status,
            "decision": decision or "",
        },
    ).decode()
    r.set(
        keys.verdict_meta(verdict.id), json.dumps({"tenant": tenant, "urls": urls or [], "entry_id": entry})
    )
    return verdict, entry


def session(server: ConsoleServer, reviewer: str) -> requests.Session:
    """A browser-like session logged in through the form."""
    s = requests.Session()
    page = s.get(server.base + "/login", timeout=10)
    csrf = form_value(page.text, "csrf")
    answer = s.post(
        server.base + "/login",
        data={"token": TOKENS[reviewer], "csrf": csrf, "next": "/"},
        allow_redirects=False,
        timeout=10,
    )
    assert answer.status_code == 303, answer.text
    return s


def form_value(html: str, name: str) -> str:
    import re

    match = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert match, f"no {name} field in the page"
    return match.group(1)
