"""worker/runtime.py sizes native thread pools: checked in fresh interpreters, since the
settings are process-wide."""

import subprocess
import sys

import pytest

pytest.importorskip("cv2")

BEFORE_IMPORT = """
from worker.runtime import configure_threads
from modgate.settings import RuntimeSettings
configure_threads(RuntimeSettings(preprocess_threads=1))
import cv2
print(cv2.getNumThreads())
"""

AFTER_IMPORT = """
import cv2, torch
cv2.setNumThreads(4)
from worker.runtime import configure_threads
from modgate.settings import RuntimeSettings
configure_threads(RuntimeSettings(preprocess_threads=1, threads=1))
print(cv2.getNumThreads(), torch.get_num_threads())
"""


def run(code: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout.strip()


def test_opencv_threads_apply_when_cv2_is_imported_later():
    assert run(BEFORE_IMPORT) == "1"


def test_opencv_and_torch_threads_apply_when_already_imported():
    assert run(AFTER_IMPORT) == "1 1"


def test_pipeline_settings_default_to_one_opencv_thread():
    from modgate.settings import load_settings

    assert load_settings().runtime.preprocess_threads == 1


def test_cpu_cores_is_within_the_affinity_mask():
    import os

    from worker.runtime import cpu_cores

    assert 1 <= cpu_cores() <= len(os.sched_getaffinity(0))
