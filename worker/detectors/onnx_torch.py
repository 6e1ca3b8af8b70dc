"""The runtime behind the ONNX detectors (open_nsfw, nudenet): onnxruntime, or a torch
module converted from the same ONNX file at load time (onnx2torch).

The torch route runs the graph on the torch device, in the process's CUDA context and
under the same autocast as the other models; ``runtime.onnx`` chooses, and ``auto`` takes
it on CUDA and keeps onnxruntime on CPU, where it is faster (bench/bench_onnx_runtimes.py).

On CPU a batch is split across ``runtime.threads`` lanes (default: the cores), each run
single-threaded, rather than each operator split across an intra-op pool. The pool's
caller spins (``SpinPause``, whatever ``allow_spinning`` says) at the end of every
parallel operator until its workers finish, and on a node whose cores the decode threads
keep busy a worker is often waiting for a core: measured 5.5 % of the process's CPU (17 %
of the inference thread's) in that spin. Lanes never wait on each other mid-graph, and a
caller waiting for a lane sleeps, leaving the core to the decode threads.
"""

from __future__ import annotations

import logging
import warnings
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from modgate.errors import ConfigError

if TYPE_CHECKING:
    from modgate.settings import Settings

log = logging.getLogger(__name__)

Runtime = Literal["onnxruntime", "torch"]

# onnx2torch 1.5.15's Slice indexes with a list, which torch deprecates but still reads
# as a tuple of slices (parity is tested); the warning would otherwise be logged per process.
warnings.filterwarnings(
    "ignore",
    message="Using a non-tuple sequence for multidimensional indexing",
    module=r"onnx2torch\.node_converters\.slice",
)


def choose_runtime(setting: str, device: str) -> Runtime:
    """``runtime.onnx`` for a resolved device: auto = torch on CUDA, onnxruntime on CPU."""
    if setting == "auto":
        return "torch" if device == "cuda" else "onnxruntime"
    if setting not in ("onnxruntime", "torch"):
        raise ConfigError(f"runtime.onnx must be auto, onnxruntime or torch, not {setting!r}")
    return setting  # type: ignore[return-value]


class OnnxModel:
    """One ONNX graph behind ``run``: a batch (numpy or torch) in, a numpy array out."""

    runtime: Runtime
    device: str  # "cpu" or "cuda": where the graph actually runs

    def run(self, batch: Any) -> np.ndarray:
        raise NotImplementedError


class OrtModel(OnnxModel):
    runtime: Runtime = "onnxruntime"

    def __init__(self, path: Path, settings: Settings, device: str) -> None:
        import onnxruntime as ort

        from worker.runtime import cpu_cores

        providers = ["CPUExecutionProvider"]
        if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        threads = settings.runtime.threads
        # Batch lanes on CPU (module docstring); on CUDA the intra-op pool only feeds the GPU.
        self.lanes = 1
        if providers[0] == "CPUExecutionProvider" and settings.runtime.onnx_cpu_parallel == "batch":
            self.lanes, threads = threads or cpu_cores(), 1
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle intra-op threads spin by default, burning the cores that decode threads need
        # between batches; blocking instead lets decoding overlap inference.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        # Where it really runs: without the CUDA provider this is "cpu" even on a GPU node,
        # and the start-up device check refuses it by name.
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self._input = self.session.get_inputs()[0].name
        self._output = self.session.get_outputs()[0].name

    def run(self, batch: Any) -> np.ndarray:
        if not isinstance(batch, np.ndarray):
            batch = batch.cpu().numpy()
        lanes = min(self.lanes, len(batch))
        if lanes <= 1:
            return self._run(batch)
        # InferenceSession.run is thread-safe and releases the GIL; this thread runs the
        # first chunk and then sleeps on the others' futures (no spinning).
        first, *rest = np.array_split(batch, lanes)
        futures = [_lane_pool(self.lanes).submit(self._run, chunk) for chunk in rest]
        out = [self._run(first)]
        out += [f.result() for f in futures]
        return np.concatenate(out)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self._output], {self._input: batch})[0]


@cache
def _lane_pool(lanes: int) -> ThreadPoolExecutor:
    """The threads that run a CPU batch's other chunks, shared by every session (one
    detector runs at a time, on the inference thread)."""
    return ThreadPoolExecutor(lanes - 1, thread_name_prefix="modgate-ort-lane")


class TorchModel(OnnxModel):
    runtime: Runtime = "torch"

    def __init__(self, module: Any, device: str, precision: str = "fp32") -> None:
        import torch

        self.device = device
        self._device = torch.device(device)
        self.module = module.eval().to(self._device)
        if self._device.type == "cuda":
            # cuDNN's fast conv kernels (bf16/fp16 above all) want NHWC; weights in that
            # format make every convolution pick it.
            self.module = self.module.to(memory_format=torch.channels_last)
        self.autocast: Any = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]

    @classmethod
    def convert(cls, path: Path, device: str, precision: str = "fp32") -> TorchModel:
        try:
            import onnx
            from onnx2torch import convert
        except ImportError as exc:
            raise ConfigError(
                f"runtime.onnx=torch needs onnx2torch and onnx ({exc}); pip install onnx2torch"
            ) from exc
        try:
            module = convert(onnx.load(str(path)))
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            raise ConfigError(f"cannot convert {path} to a torch module: {reason}") from exc
        return cls(module, device, precision)

    def run(self, batch: Any) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.as_tensor(batch).to(self._device, non_blocking=True)
            with torch.autocast(self._device.type, dtype=self.autocast, enabled=self.autocast is not None):
                out = self.module(x)
            return out.float().cpu().numpy()


def load_onnx_model(
    path: Path, settings: Settings, device: str | None = None, precision: str | None = None
) -> OnnxModel:
    """The ONNX file at ``path`` on the runtime ``settings.runtime.onnx`` picks for
    ``device`` (default: the resolved ``settings.runtime.device``). On torch it runs under
    autocast at ``precision`` (default ``settings.runtime.precision``); onnxruntime runs
    the file as it is (fp32)."""
    from worker.detectors import resolve_device

    device = device or resolve_device(settings.runtime.device)
    runtime = choose_runtime(settings.runtime.onnx, device)
    if runtime == "torch":
        return TorchModel.convert(path, device, precision or settings.runtime.precision)
    return OrtModel(path, settings, device)
