"""Process-wide thread pools of the native libraries the stages use, sized once per
process so that decode threads and inference do not fight over the cores.

Parallelism across images comes from the decode threads (``decode.workers``) and across a
batch from the inference runtime (``runtime.threads``); a library that also splits one
image's work over every core (OpenCV's ``parallel_for``) only adds threads that contend
with both, and OpenCV's pool busy-waits between calls.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from modgate.settings import RuntimeSettings


def configure_threads(runtime: RuntimeSettings) -> None:
    """Apply ``runtime.preprocess_threads`` to OpenCV (now if imported, else when it is:
    OpenCV reads ``OPENCV_FOR_THREADS_NUM`` at import) and ``runtime.threads`` to torch's
    intra-op pool when torch is loaded. Idempotent; cheap; imports nothing heavy."""
    os.environ["OPENCV_FOR_THREADS_NUM"] = str(runtime.preprocess_threads)
    cv2 = sys.modules.get("cv2")
    if cv2 is not None and hasattr(cv2, "setNumThreads"):
        cv2.setNumThreads(runtime.preprocess_threads)
    torch = sys.modules.get("torch")
    if runtime.threads and torch is not None and torch.get_num_threads() != runtime.threads:
        torch.set_num_threads(runtime.threads)


def cpu_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return cores
