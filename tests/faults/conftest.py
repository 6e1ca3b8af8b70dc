"""Fixtures of the fault suite: a restartable redis-server with the AOF settings the
project ships, moto behind a fault-injecting proxy, real `modgate worker` processes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis
import yaml

from tests.conftest import REPO
from tests.faults.proxy import FaultProxy
from tests.servers import RedisServer

SECRET = "whsec-fault-suite-4711"
# Short enough that a stalled pipeline shows up as timeouts inside the suite's time budget.
MESSAGE_TIMEOUT_S = 30


def shipped_redis_persistence() -> dict[str, object]:
    """The AOF settings of the Redis the project ships (docker/compose.yaml), so the
    kill -9 scenario runs against exactly that configuration."""
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    args = compose["services"]["redis"]["command"]
    opts = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
    return {
        "appendonly": opts.get("--appendonly", "no") == "yes",
        "appendfsync": opts.get("--appendfsync", "everysec"),
    }


@pytest.fixture
def durable_redis(tmp_path: Path):
    server = RedisServer(tmp_path / "redis", **shipped_redis_persistence())
    yield server
    server.stop()


@pytest.fixture
def r(durable_redis: RedisServer) -> redis.Redis:
    # Retries ride over the restarts the scenarios cause while the test polls.
    return redis.Redis.from_url(durable_redis.url, socket_timeout=5, retry_on_error=[redis.ConnectionError])


@pytest.fixture
def s3_proxy(moto_server):
    proxy = FaultProxy(moto_server.url)
    yield proxy
    proxy.stop()


@pytest.fixture
def env(s3_env, durable_redis, s3_proxy) -> dict[str, str]:
    """A worker that reaches S3 only through the proxy (test uploads go to moto directly)."""
    return {
        **s3_env,
        "MODGATE_S3__ENDPOINT_URL": s3_proxy.url,
        "MODGATE_REDIS__URL": durable_redis.url,
        "MODGATE_DETECTORS__ENABLED": '["open_nsfw"]',
        "MODGATE_WEBHOOK__ALLOW_HOSTS": '["127.0.0.1", "127.0.0.2"]',
        "MODGATE_WEBHOOK__SECRET": SECRET,
        "MODGATE_WEBHOOK__BACKOFF_BASE_S": "0.2",
        "MODGATE_WORKER__MESSAGE_TIMEOUT_S": str(MESSAGE_TIMEOUT_S),
        "MODGATE_WORKER__VISIBILITY_TIMEOUT_S": str(MESSAGE_TIMEOUT_S + 30),
        "MODGATE_WORKER__LOG_FORMAT": "text",
        "MODGATE_BATCH__MAX_WAIT_MS": "20",
    }


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (a decode pool counts too)."""
    total = 0
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
            for task in os.listdir(f"/proc/{p}/task"):
                stack += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
    return total * 1024
