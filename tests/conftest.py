import os
import uuid
from pathlib import Path

import pytest

from tests.servers import MotoServer, RedisServer, WorkerProcess

REPO = Path(__file__).resolve().parents[1]

AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def moto_server():
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_env(moto_server):
    """Env for code under test (also exported to this process and its children)."""
    env = {**AWS_TEST_ENV, "MODGATE_S3__ENDPOINT_URL": moto_server.url}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def s3_client(s3_env, moto_server):
    import boto3

    return boto3.client("s3", endpoint_url=moto_server.url, region_name="us-east-1")


@pytest.fixture
def bucket(s3_client):
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def workers(tmp_path):
    """Start real ``modgate worker`` processes (``workers(env, name, queues=...)``); each is
    stopped when the test ends."""
    started: list[WorkerProcess] = []

    def start(env: dict[str, str], name: str = "w", **kw) -> WorkerProcess:
        w = WorkerProcess(env, tmp_path / f"{name}-{len(started)}.log", **kw)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


def _find_shared() -> Path:
    """../shared holds original weights and reference outputs; the project never copies them."""
    candidates = [
        os.environ.get("MODGATE_SHARED_DIR"),
        Path(__file__).resolve().parents[2] / "shared",
        "/work/shared",
    ]
    for candidate in candidates:
        if candidate and (Path(candidate) / "models").is_dir():
            return Path(candidate)
    raise RuntimeError("cannot find the shared models directory; set MODGATE_SHARED_DIR")


SHARED = _find_shared()
