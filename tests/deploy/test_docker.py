"""Dockerfiles lint clean with hadolint; the compose stack wires what the README says."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

DOCKER = REPO / "docker"
HADOLINT = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")


@pytest.mark.parametrize("dockerfile", ["worker.Dockerfile", "producer.Dockerfile"])
def test_dockerfiles_lint_clean(dockerfile):
    out = subprocess.run(
        [HADOLINT, "--no-color", str(DOCKER / dockerfile)], capture_output=True, text=True, cwd=REPO
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("dockerfile", ["worker.Dockerfile", "producer.Dockerfile"])
def test_images_run_as_non_root_with_a_healthcheck(dockerfile):
    text = (DOCKER / dockerfile).read_text()
    assert "USER 10001:10001" in text and "HEALTHCHECK" in text
    assert text.index("USER 10001") > text.rindex("FROM ")  # the final stage runs unprivileged


def test_worker_image_can_bake_models_and_producer_image_has_no_torch():
    worker = (DOCKER / "worker.Dockerfile").read_text()
    assert "ARG BAKE_MODELS" in worker and "modgate models pull" in worker and "nvidia/cuda" in worker
    lines = (DOCKER / "producer-requirements.txt").read_text().lower().splitlines()
    requirements = " ".join(line for line in lines if not line.startswith("#"))
    assert "celery" in requirements and "fastapi" in requirements
    assert not any(heavy in requirements for heavy in ("torch", "transformers", "onnxruntime", "open_clip"))


def test_compose_stack():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"redis", "minio", "minio-init", "receiver", "worker", "dispatcher"} <= set(services)
    assert "--appendonly" in services["redis"]["command"]
    assert services["dispatcher"]["command"] == ["worker", "--queues", "modgate.webhooks"]
    assert services["worker"]["command"] == ["worker", "--queues", "modgate"]
    assert (
        services["minio"]["environment"]["MINIO_NOTIFY_WEBHOOK_ENDPOINT_MODGATE"]
        == "http://receiver:8080/events"
    )
    for name in ("receiver", "worker", "dispatcher"):
        assert services[name]["read_only"] is True
