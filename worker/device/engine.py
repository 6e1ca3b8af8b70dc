"""The device side of the pipeline: the inference batcher, the tensor decode batch and the
detectors' forward passes, on prepared frames or on JPEG bytes.

``LocalEngine`` runs it in this process (CPU nodes, one-process GPU workers, and the
``modgate serve-inference`` process, which owns the CUDA context). ``worker.device.engine_client``
has the same two calls over a Unix socket, so several ingest processes feed one GPU. The
pipeline talks to either through ``submit_frame`` / ``submit_jpeg`` and never sees which.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from modgate.errors import ErrorCode, ModerationError
from modgate.settings import Settings
from worker.detectors import LoadedDetectors
from worker.detectors.base import DetectorOutput
from worker.device.batcher import BatchInfo, DynamicBatcher
from worker.ingest.decode import Frame

log = logging.getLogger(__name__)

# Key of the CLIP backbone's preprocessed input in PreparedFrame.inputs.
CLIP = "clip_backbone"


class Cancelled(Exception):
    """The job's ``Cancel`` was set before its verdict was ready; no verdict will come. Set on
    a job's future by the pipeline, or by an engine that drops a cancelled request."""


@dataclass(frozen=True)
class PreparedFrame:
    """A decoded frame with every detector's preprocessed input, built on a decode thread."""

    frame: Frame | None  # None when a decode process prepared every input (only those came back)
    inputs: dict[str, Any]


@dataclass
class FrameResult:
    outputs: dict[str, DetectorOutput]
    errors: dict[str, str]
    batch_size: int
    queue_ms: float
    infer_ms: float


@dataclass(frozen=True)
class InferredImage:
    """A JPEG through the tensor path and the models in one go: what the pipeline needs of
    it (no pixels: on a remote engine they never leave the inference process)."""

    format: str
    width: int
    height: int
    frame_count: int
    decode_s: float
    prepare_s: float
    result: FrameResult
    # (PDQ hex, quality) of each frame, hashed where it was decoded; None: not hashed (the
    # engine's hashing.pdq is off).
    pdqs: tuple[tuple[str, int], ...] | None = None
    # (PDQ hex, quality) of the pixels as the file stores them (ThreatExchange's hash of the
    # file), where the EXIF orientation is not 1; else None.
    pdq_file: tuple[str, int] | None = None


class Engine(Protocol):
    """What the pipeline needs of the device side, local or remote."""

    detectors: Any  # LoadedDetectors, or the metadata a remote engine sent (same surface)
    tensor: bool  # submit_jpeg is available

    def submit_frame(self, frame: PreparedFrame) -> Future[FrameResult]: ...

    def submit_jpeg(self, data: bytes, cancel: Any = None) -> Future[Any]:
        """Future of ``InferredImage``, ``decode_tensor.Fallback`` (take the PIL path),
        ``decode_tensor.Cancelled`` or ``ModerationError`` (the decode budget refused it);
        an exception means: take the PIL path."""
        ...

    def alive(self) -> bool: ...

    def close(self) -> None: ...


def stack(inputs: list[Any]) -> Any:
    """A batch of per-frame inputs: numpy for the PIL path's, ``stack_inputs`` (torch, on
    the device) once the tensor path's are among them."""
    if all(isinstance(x, np.ndarray) for x in inputs):
        return np.stack(inputs)
    from worker.detectors.inputs import stack_inputs

    return stack_inputs(inputs)


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


class LocalEngine:
    def __init__(self, settings: Settings, detectors: LoadedDetectors, on_batch: Any = None) -> None:
        self.detectors = detectors
        self._on_batch = on_batch
        self._batcher: DynamicBatcher[PreparedFrame, FrameResult] = DynamicBatcher(
            self._infer,
            max_batch=settings.batch.max_batch,
            max_wait_s=settings.batch.max_wait_ms / 1000.0,
            name="modgate-batcher",
        )
        self._tensor = self._tensor_stage_for(settings)
        self.tensor = self._tensor is not None

    # -- public -------------------------------------------------------------------------

    def submit_frame(self, frame: PreparedFrame) -> Future[FrameResult]:
        return self._batcher.submit(frame)

    def submit_jpeg(self, data: bytes, cancel: Any = None) -> Future[Any]:
        if self._tensor is None:
            raise RuntimeError("this engine has no tensor decode path")
        out: Future[Any] = Future()
        self._tensor.submit(data, cancel).add_done_callback(lambda f: self._decoded(f, cancel, out))
        return out

    def alive(self) -> bool:
        """False once the inference thread (or the decode-batch thread) has died."""
        return self._batcher.alive() and (self._tensor is None or self._tensor.alive())

    def close(self) -> None:
        if self._tensor is not None:
            self._tensor.close()
        self._batcher.close()

    # -- the tensor path ----------------------------------------------------------------

    def _tensor_stage_for(self, settings: Settings) -> Any:
        """The tensor decode path's batcher (worker/device/preprocess_tensor.py), when
        ``decode.backend`` resolves to it on this device; None: PIL only."""
        if settings.decode.backend == "pil":
            return None
        from worker.detectors.clip_backbone import torch_device
        from worker.device.decode_tensor import backend_for

        device = torch_device(settings)
        if backend_for(settings.decode.backend, device.type) != "tensor":
            return None
        from worker.device.preprocess_tensor import TensorPath, TensorStage

        path = TensorPath(
            settings.decode,
            device,
            self.detectors.backbone,
            self.detectors.detectors,
            pdq=settings.hashing.pdq != "off",
        )
        return TensorStage(path, settings.batch.max_batch, settings.batch.max_wait_ms / 1000.0)

    def _decoded(self, future: Future[Any], cancel: Any, out: Future[Any]) -> None:
        """On the decode-batch thread: a decoded, prepared image goes on to the inference
        batcher; anything else (Fallback, Cancelled, a budget error, an exception) is the
        outcome as it is."""
        from worker.device.decode_tensor import Cancelled as NotDecoded
        from worker.device.preprocess_tensor import TensorResult

        try:
            outcome = future.result()
        except Exception as exc:
            out.set_exception(exc)
            return
        if not isinstance(outcome, TensorResult):
            out.set_result(outcome)
            return
        if cancel is not None and cancel.cancelled:
            out.set_result(NotDecoded())  # do not spend a batch slot on it
            return
        image = outcome.image

        def inferred(f: Future[FrameResult]) -> None:
            try:
                result = f.result()
            except Exception as exc:  # the batcher resolves every item; belt and braces
                out.set_exception(exc)
                return
            out.set_result(
                InferredImage(
                    image.format, image.width, image.height, image.frame_count,
                    outcome.decode_s, outcome.prepare_s, result, outcome.pdqs, outcome.pdq_file,
                )
            )  # fmt: skip

        self._batcher.submit(PreparedFrame(None, outcome.inputs)).add_done_callback(inferred)

    # -- inference ----------------------------------------------------------------------

    def _infer(self, frames: Sequence[PreparedFrame], info: BatchInfo) -> list[FrameResult]:
        t = time.perf_counter()
        if self._on_batch is not None:
            self._on_batch(len(frames))
        outputs: list[dict[str, DetectorOutput]] = [{} for _ in frames]
        errors: list[dict[str, str]] = [{} for _ in frames]
        embeddings = self._embed(frames, errors)
        for detector in self.detectors.detectors:
            if detector.input == "clip_embedding":
                inputs: list[Any] = embeddings
            else:
                inputs = [f.inputs[detector.id] for f in frames]
            if all(x is not None for x in inputs):
                try:
                    batch_out = detector.infer(inputs)
                except Exception as exc:
                    log.warning(
                        "%s failed on a batch of %d (%s); retrying one by one", detector.id, len(frames), exc
                    )
                    batch_out = self._infer_singly(detector, inputs, errors)
            else:
                batch_out = self._infer_singly(detector, inputs, errors)
            for i, out in enumerate(batch_out):
                if out is not None:
                    outputs[i][detector.id] = out
        infer_ms = _ms(time.perf_counter() - t)
        return [
            FrameResult(outputs[i], errors[i], info.size, _ms(info.waited_s[i]), infer_ms)
            for i in range(len(frames))
        ]

    @staticmethod
    def _infer_singly(detector: Any, inputs: list[Any], errors: list[dict[str, str]]) -> list[Any]:
        """Isolate the frame that broke a batch; frames without input (failed upstream) get none."""
        out: list[Any] = []
        for i, one in enumerate(inputs):
            if one is None:
                out.append(None)
                continue
            try:
                out.append(detector.infer([one])[0])
            except Exception as exc:
                errors[i][detector.id] = f"{type(exc).__name__}: {exc}"
                out.append(None)
        return out

    def _embed(self, frames: Sequence[PreparedFrame], errors: list[dict[str, str]]) -> list[Any]:
        """One backbone forward pass for the whole batch; every CLIP head reads its rows."""
        backbone = self.detectors.backbone
        if backbone is None:
            return [None] * len(frames)
        try:
            return list(backbone.embed(stack([f.inputs[CLIP] for f in frames])))
        except Exception as exc:
            log.warning("clip backbone failed on a batch of %d (%s); retrying one by one", len(frames), exc)
        rows: list[Any] = []
        for i, f in enumerate(frames):
            try:
                rows.append(backbone.embed(f.inputs[CLIP][None])[0])
            except Exception as exc:
                rows.append(None)
                for d in self.detectors.detectors:
                    if d.input == "clip_embedding":
                        errors[i][d.id] = f"clip backbone: {type(exc).__name__}: {exc}"
        return rows


def prepare_inputs(detectors: Any, frame: Frame, keys: Sequence[str] | None = None) -> dict[str, Any]:
    """Every detector's input for ``frame`` (only ``keys`` when given), on this thread."""
    inputs = {}
    backbone = detectors.backbone
    if backbone is not None and (keys is None or CLIP in keys):
        inputs[CLIP] = backbone.prepare(frame)
    for detector in detectors.detectors:
        if detector.input != "image" or (keys is not None and detector.id not in keys):
            continue
        try:
            inputs[detector.id] = detector.prepare(frame)
        except Exception as exc:
            raise ModerationError(
                ErrorCode.DETECTOR_FAILED,
                f"{detector.id}: preprocessing failed: {type(exc).__name__}: {exc}",
            ) from None
    return inputs
