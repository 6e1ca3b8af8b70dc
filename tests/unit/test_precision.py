"""docs/devices.md, "Devices and precision": what reduced precision promises, on every CPU kernel path.

The promise is about the CLIP backbone (the only part that runs under autocast): its
embeddings stay within cosine 0.9999 and 1 % (relative to the largest component) of
fp32, and the heads always compute in fp32 on those embeddings. LAION's NSFW head gets a
promise for its network only: its categorical lookups compare values at six decimals, so
its score is discontinuous and no precision setting (nor fp32 on another processor) can
bound what they do. The tests below check each part for that reason, and run the
measurement under several of torch's and oneDNN's kernel paths, so a processor this
project has not met is rehearsed here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import REPO, SHARED
from tests.precision_probe import measure
from worker.detectors import load_laion_nsfw

MIN_COSINE = 0.9999
MAX_RELATIVE = 0.01
MAX_HEAD_NETWORK_DELTA = 0.02

# Kernel paths to rehearse: torch's ATen dispatch level × oneDNN's ISA cap (reduced-precision
# matmuls go through oneDNN on CPU) × intra-op threads. oneDNN's cap falls back to what the
# processor has, but ATen's level does not (ATEN_CPU_CAPABILITY=avx512 on a processor
# without AVX-512 dies of SIGILL), so a path whose instructions this one lacks is skipped;
# the probe reports what actually ran.
KERNEL_PATHS = {
    "aten-default": {"ATEN_CPU_CAPABILITY": "default"},
    "avx2-only": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "avx512-core": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
    # AMD Zen 4 and Cooper Lake: AVX-512 with BF16, no AVX512-FP16, no AMX.
    "avx512-bf16": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
    "native": {},
    "native-1-thread": {"OMP_NUM_THREADS": "1"},
}

_AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq"}
REQUIRES = {"avx2-only": {"avx2", "fma"}, "avx512-core": _AVX512, "avx512-bf16": _AVX512}


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def check_promise(report: dict, precision: str) -> None:
    m = report[precision]
    where = f"{precision} on {report['capability']} (oneDNN cap {report['onednn_max_cpu_isa']})"
    assert m["embedding_dtype"] == "torch.float32", f"{where}: heads must receive fp32 embeddings"
    assert m["min_cosine"] >= MIN_COSINE, where
    assert m["max_relative"] <= MAX_RELATIVE, where
    assert m["head_network_delta"] <= MAX_HEAD_NETWORK_DELTA, where


@pytest.fixture(scope="module")
def here(tmp_path_factory):
    return measure(tmp_path_factory.mktemp("precision"))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_keeps_the_promise_on_this_processor(here, precision):
    check_promise(here, precision)


@pytest.mark.parametrize("path", sorted(KERNEL_PATHS))
def test_reduced_precision_keeps_the_promise_on_every_kernel_path(path):
    missing = REQUIRES.get(path, set()) - cpu_flags()
    if missing:
        pytest.skip(f"this processor lacks {', '.join(sorted(missing))}: {path} cannot run here")
    env = {**os.environ, **KERNEL_PATHS[path]}
    out = subprocess.run(
        [sys.executable, "-m", "tests.precision_probe"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    print(path, json.dumps(report))
    for precision in ("bf16", "fp16"):
        check_promise(report, precision)


@pytest.fixture(scope="module")
def laion():
    head = load_laion_nsfw(SHARED / "models" / "laion-clip-nsfw" / "clip_autokeras_binary_nsfw.zip")
    reference = np.load(SHARED / "reference" / "laion_l14_dev.npz")
    return head, torch.tensor(reference["embeddings"])


@pytest.mark.parametrize(("dtype", "bound"), [(torch.bfloat16, 0.01), (torch.float16, 0.002)])
def test_laion_network_on_real_embeddings_moves_little_when_they_are_rounded(laion, dtype, bound):
    """On LAION's own ViT-L/14 embeddings, rounding them to the autocast dtype (the least a
    reduced-precision backbone changes) moves the network part by at most ``bound``.
    Rounding is exact arithmetic, so this does not depend on the processor."""
    head, embeddings = laion
    columns = sorted(head.lookups)
    with torch.no_grad():
        encoded = head.encode(embeddings)
        held = head.encode(embeddings.to(dtype).to(torch.float64))
        held[:, columns] = encoded[:, columns]
        delta = (head.network(held) - head.network(encoded)).abs().max()
    assert float(delta) <= bound


def test_laion_lookups_make_its_score_discontinuous(laion):
    """Why the README promises nothing about laion_nsfw's total under a precision change:
    moving every embedding value by 1e-6 already flips lookups and moves scores a lot."""
    head, embeddings = laion
    columns = sorted(head.lookups)
    nudged = embeddings + 1e-6
    with torch.no_grad():
        flips = (head.encode(nudged)[:, columns] != head.encode(embeddings)[:, columns]).sum()
        delta = (head(nudged) - head(embeddings)).abs().max()
    assert int(flips) > 0
    assert float(delta) > 0.1
