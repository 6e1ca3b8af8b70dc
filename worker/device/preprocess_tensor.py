"""Detector preprocessing on device tensors: what each detector's PIL ``prepare`` does,
step for step, on the (3, H, W) uint8 RGB tensors of ``worker.device.decode_tensor``.

- CLIP backbone: short side to ``image_size`` with antialiased bicubic (torchvision's
  antialias kernel is Pillow's, a = -0.5, with uint8 rounding), centre crop, CLIP mean/std.
- open_nsfw: 256×256 antialiased bilinear, centre 224 crop, then its JPEG round trip on
  the CPU with Pillow (the crops come down as one uint8 batch and go back up pinned): the
  re-encode is there to reproduce the pixels the model was trained on, and nvJPEG's
  encoder/decoder (other upsampling) would not; 224² is ~1 ms of CPU a crop.
- falconsai_vit: its own (torchvision-backed) image processor, called on the tensors.
- nudenet: pad bottom/right to a square and cv2's INTER_LINEAR (no antialias) to 320,
  emulated in cv2's own fixed-point arithmetic, computed from only the 2×320 source
  rows it reads; BGR, /255.

Outputs have the shapes and layouts of the PIL path's, as tensors on the device; the
constants are read from the detectors' modules, never copied.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as tvF

from modgate.errors import ModerationError
from worker.detectors.inputs import to_device
from worker.device.decode_tensor import (
    Cancellable,
    Cancelled,
    Fallback,
    Outcome,
    TensorImage,
    decode_batch,
)

if TYPE_CHECKING:
    from modgate.settings import DecodeSettings
    from worker.detectors.base import Detector

log = logging.getLogger(__name__)

# Key of the CLIP backbone's input, as the pipeline names it.
CLIP_KEY = "clip_backbone"


def clip_input(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) uint8 → (3, size, size) float32: ``clip_backbone.clip_preprocess``."""
    from worker.detectors.clip_backbone import CLIP_MEAN, CLIP_STD

    _, h, w = pixels.shape
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    resized = tvF.resize(pixels, [new_h, new_w], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
    top = round((new_h - size) / 2.0)
    left = round((new_w - size) / 2.0)
    x = resized[:, top : top + size, left : left + size].to(torch.float32) / 255.0
    mean = torch.as_tensor(CLIP_MEAN, device=x.device)[:, None, None]
    std = torch.as_tensor(CLIP_STD, device=x.device)[:, None, None]
    return (x - mean) / std


def open_nsfw_inputs(images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """(3, H, W) uint8 each → (224, 224, 3) float32 BGR minus mean: ``open_nsfw.preprocess``."""
    from worker.detectors.open_nsfw import CROP, MEAN_BGR, RESIZE

    offset = (RESIZE - CROP) // 2
    crops = torch.stack(
        [
            tvF.resize(px, [RESIZE, RESIZE], interpolation=tvF.InterpolationMode.BILINEAR, antialias=True)[
                :, offset : offset + CROP, offset : offset + CROP
            ]
            for px in images
        ]
    )
    device = crops.device
    host = crops.permute(0, 2, 3, 1).contiguous().cpu().numpy()  # one download, uint8
    trips = np.empty_like(host)
    for i, crop in enumerate(host):
        buf = io.BytesIO()
        Image.fromarray(crop).save(buf, format="JPEG")  # Pillow's defaults, as the reference
        buf.seek(0)
        trips[i] = np.asarray(Image.open(buf))
    x = to_device(torch.from_numpy(trips), device).flip(-1).to(torch.float32)
    x = x - torch.as_tensor(MEAN_BGR, device=device)
    return list(x)


def falconsai_inputs(images: Sequence[torch.Tensor], processor: Any) -> list[torch.Tensor]:
    """(3, H, W) uint8 each → (3, 224, 224) float32: the detector's image processor, which
    runs on torch tensors (transformers' torchvision backend) wherever they are."""
    device = images[0].device
    out = processor(images=list(images), return_tensors="pt", device=device)["pixel_values"]
    return list(out)


@lru_cache(maxsize=256)
def _cv2_linear_taps(n_src: int, n_dst: int, horizontal: bool, device: str) -> tuple[torch.Tensor, ...]:
    """cv2.resize INTER_LINEAR's source indices and 11-bit weights along one axis
    (resize.cpp): a float32 source coordinate; past an edge, the horizontal pass moves
    the tap onto the edge pixel with weight 1, the vertical one keeps its weights and
    reads the edge row twice."""
    scale = 1.0 / (n_dst / n_src)  # cv2: scale_x = 1 / inv_scale_x, in double
    fx = ((np.arange(n_dst, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    sx = np.floor(fx).astype(np.int64)
    fx = (fx - sx.astype(np.float32)).astype(np.float32)
    if horizontal:
        low = sx < 0
        fx[low], sx[low] = 0.0, 0
        high = sx >= n_src - 1
        fx[high], sx[high] = 0.0, n_src - 1
    one = np.float32(2048.0)  # INTER_RESIZE_COEF_SCALE
    w0 = np.rint((np.float32(1.0) - fx) * one).astype(np.int32)
    w1 = np.rint(fx * one).astype(np.int32)
    s0 = np.clip(sx, 0, n_src - 1)
    s1 = np.clip(sx + 1, 0, n_src - 1)
    return tuple(torch.from_numpy(a).to(device) for a in (s0, s1, w0, w1))


def nudenet_input(pixels: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, int, int, float]:
    """(3, H, W) uint8 → ``nudenet.prepare_frame``'s (blob (1, 3, 320, 320), w, h, scale).

    cv2's uint8 INTER_LINEAR is two fixed-point passes: horizontal sums of pixel × 11-bit
    weight (int), then the vertical pass of its SIMD kernel, ((S0>>4)·b0>>16) +
    ((S1>>4)·b1>>16) + 2 >> 2, saturated to uint8; blobFromImage then scales by 1/255.
    Only the 2×320 rows and columns it reads are gathered (uint8), then widened."""
    from worker.detectors.nudenet import INPUT_SIZE

    n = INPUT_SIZE
    _, h, w = pixels.shape
    side = max(h, w)
    dev = str(pixels.device)
    ys0, ys1, b0, b1 = _cv2_linear_taps(side, n, False, dev)
    xs0, xs1, a0, a1 = _cv2_linear_taps(side, n, True, dev)
    ys, xs = torch.cat([ys0, ys1]), torch.cat([xs0, xs1])
    # decode_jpeg's tensors are (H, W, 3) in memory: whole rows first (contiguous copies),
    # then columns of those, 640 × 640 × 3 uint8, before widening.
    hwc = pixels.permute(1, 2, 0)
    rows = hwc.index_select(0, ys.clamp(max=h - 1))
    rows[ys >= h] = 0  # the padding (bottom/right) reads as zero
    taps = rows.index_select(1, xs.clamp(max=w - 1))
    taps[:, xs >= w] = 0
    taps = taps.to(torch.int32)
    wa0, wa1 = a0[None, :, None], a1[None, :, None]
    top = taps[:n, :n] * wa0 + taps[:n, n:] * wa1
    bottom = taps[n:, :n] * wa0 + taps[n:, n:] * wa1
    out = ((((top >> 4) * b0[:, None, None]) >> 16) + (((bottom >> 4) * b1[:, None, None]) >> 16) + 2) >> 2
    out = out.clamp(0, 255).permute(2, 0, 1)
    blob = out.flip(0).to(torch.float32) * np.float32(1.0 / 255.0)  # RGB → BGR, as swapRB
    return blob[None], w, h, scale


class TensorPreprocessor:
    """Every enabled detector's input for a batch of decoded tensors, keyed like the
    pipeline's ``PreparedFrame.inputs``. A detector without a tensor preprocessing gets
    its PIL ``prepare`` on a host copy of the frame (correct, not fast; logged once)."""

    def __init__(self, backbone: Any | None, detectors: Sequence[Detector]) -> None:
        # step(images, live) → one input per image; live(i) False: image i's job was
        # cancelled (per-image host steps skip it; batched device steps run regardless).
        self._steps: dict[str, Callable[[list[TensorImage], Callable[[int], bool]], list[Any]]] = {}
        if backbone is not None:
            size = int(backbone.image_size)
            self._steps[CLIP_KEY] = lambda ims, _: [clip_input(im.pixels, size) for im in ims]
        for det in detectors:
            if det.input != "image":
                continue
            if det.id == "open_nsfw":
                self._steps[det.id] = lambda ims, _: open_nsfw_inputs([im.pixels for im in ims])
            elif det.id == "nudenet":
                self._steps[det.id] = lambda ims, _: [nudenet_input(im.pixels) for im in ims]
            elif det.id == "falconsai_vit" and hasattr(det, "processor"):
                proc = det.processor
                self._steps[det.id] = lambda ims, _, p=proc: falconsai_inputs([im.pixels for im in ims], p)
            else:
                log.warning("%s: no tensor preprocessing; its PIL prepare runs on a host copy", det.id)
                self._steps[det.id] = lambda ims, live, d=det: [
                    d.prepare(_host_frame(im)) if live(i) else None for i, im in enumerate(ims)
                ]

    @property
    def keys(self) -> list[str]:
        return list(self._steps)

    def prepare(
        self, images: Sequence[TensorImage], live: Callable[[int], bool] | None = None
    ) -> list[dict[str, Any]]:
        """One inputs dict per image; raises whatever a step raises (the caller retries
        image by image to isolate it). ``live(i)``: whether image i is still wanted."""
        batch = list(images)
        if not batch:
            return []
        out: list[dict[str, Any]] = [{} for _ in batch]
        for key, step in self._steps.items():
            for row, value in zip(out, step(batch, live or (lambda _: True)), strict=True):
                row[key] = value
        return out


def _host_frame(image: TensorImage) -> Any:
    from worker.ingest.decode import Frame

    array = image.pixels.permute(1, 2, 0).contiguous().cpu().numpy()
    return Frame(Image.fromarray(array), 1.0, 0, image.orientation)


@dataclass(frozen=True)
class TensorResult:
    """One image through the tensor path: its decode and every detector's input."""

    image: TensorImage
    inputs: dict[str, Any]
    decode_s: float  # this image's share of the batch's decode
    prepare_s: float  # ... and of its preprocessing (and its PDQ)
    # (PDQ hex, quality) of each frame, hashed where the frame is (worker.device.pdq_tensor);
    # None when the path was made without hashing.
    pdqs: tuple[tuple[str, int], ...] | None = None
    # (PDQ hex, quality) of the pixels as the file stores them, where the image's EXIF
    # orientation is not 1 (ThreatExchange's hash of the file); else None.
    pdq_file: tuple[str, int] | None = None


TensorOutcome = TensorResult | Fallback | Cancelled | ModerationError


class TensorPath:
    """The tensor path's batch function: ``decode_batch``, then every detector's
    preprocessing on the decoded tensors, and (``pdq``) each frame's PDQ (and, for an image
    turned by its EXIF orientation, the PDQ of the file as stored). Whatever fails
    for one image (its decode, its preprocessing, its hash) becomes a Fallback for that
    image; the others go on."""

    def __init__(
        self,
        settings: DecodeSettings,
        device: torch.device | str,
        backbone: Any | None,
        detectors: Sequence[Detector],
        pdq: bool = False,
    ) -> None:
        self.settings = settings
        self.device = torch.device(device)
        self.preprocessor = TensorPreprocessor(backbone, detectors)
        self.pdq = pdq

    def run(
        self, datas: Sequence[bytes], cancels: Sequence[Cancellable | None] | None = None
    ) -> list[TensorOutcome]:
        t0 = time.perf_counter()
        outcomes: list[Outcome] = decode_batch(datas, self.settings, self.device, cancels)
        ready = [
            i
            for i, o in enumerate(outcomes)
            if isinstance(o, TensorImage)
            and not (cancels is not None and cancels[i] is not None and cancels[i].cancelled)
        ]
        results: list[TensorOutcome] = [
            Cancelled() if isinstance(o, TensorImage) else o  # cancelled since it was decoded
            for o in outcomes
        ]
        if not ready:
            return results
        t1 = time.perf_counter()
        images: list[TensorImage] = [outcomes[i] for i in ready]  # type: ignore[misc]

        def cancelled(k: int) -> bool:
            cancel = cancels[ready[k]] if cancels is not None else None
            return cancel is not None and cancel.cancelled

        try:
            prepared: list[dict[str, Any] | Fallback] = list(
                self.preprocessor.prepare(images, lambda k: not cancelled(k))
            )
        except Exception:
            prepared = [self._prepare_one(image) for image in images]
        pdqs = [self._pdq(image) if self.pdq and not cancelled(k) else None for k, image in enumerate(images)]
        t2 = time.perf_counter()
        decode_s, prepare_s = (t1 - t0) / len(ready), (t2 - t1) / len(ready)
        for k, (i, image, inputs, pdq) in enumerate(zip(ready, images, prepared, pdqs, strict=True)):
            if cancelled(k):
                results[i] = Cancelled()  # while its batch was being preprocessed
            elif isinstance(inputs, Fallback):
                results[i] = inputs
            elif isinstance(pdq, Fallback):
                results[i] = pdq
            elif pdq is None:
                results[i] = TensorResult(image, inputs, decode_s, prepare_s)
            else:
                results[i] = TensorResult(image, inputs, decode_s, prepare_s, (pdq[0],), pdq[1])
        return results

    @staticmethod
    def _pdq(image: TensorImage) -> tuple[tuple[str, int], tuple[str, int] | None] | Fallback:
        """(the frame's PDQ, ``pdq_file`` or None), or a Fallback."""
        from worker.device.pdq_tensor import pdq_of_tensor

        try:
            stored = pdq_of_tensor(image.pixels, image.orientation) if image.orientation != 1 else None
            return pdq_of_tensor(image.pixels), stored
        except Exception as exc:
            # The PIL path hashes what it decodes: never a verdict without its hash.
            log.warning("PDQ on the device failed (%s: %s); this image goes to PIL", type(exc).__name__, exc)
            return Fallback(f"pdq: {type(exc).__name__}")

    def _prepare_one(self, image: TensorImage) -> dict[str, Any] | Fallback:
        try:
            return self.preprocessor.prepare([image])[0]
        except Exception as exc:
            log.warning(
                "tensor preprocessing failed (%s: %s); this image goes to PIL", type(exc).__name__, exc
            )
            return Fallback(f"preprocess: {type(exc).__name__}")


class TensorStage:
    """Where the decode batch forms: a DynamicBatcher of fetched JPEG bytes (with their
    jobs' cancellation) whose one thread runs ``TensorPath.run`` on each batch. The
    futures resolve on that thread; a batch that raises is retried item by item by the
    batcher, and an item that still raises resolves with the exception (the caller sends
    that image down the PIL path)."""

    def __init__(self, path: TensorPath, max_batch: int, max_wait_s: float) -> None:
        from worker.device.batcher import DynamicBatcher

        self.path = path
        self._batcher: DynamicBatcher[tuple[bytes, Cancellable | None], TensorOutcome] = DynamicBatcher(
            self._run, max_batch=max_batch, max_wait_s=max_wait_s, name="modgate-decode-batch"
        )

    def submit(self, data: bytes, cancel: Cancellable | None = None) -> Any:
        """Future[TensorOutcome] for one image."""
        return self._batcher.submit((data, cancel))

    def alive(self) -> bool:
        return self._batcher.alive()

    def close(self) -> None:
        self._batcher.close()

    def _run(self, items: Sequence[tuple[bytes, Cancellable | None]], _info: Any) -> list[TensorOutcome]:
        return self.path.run([data for data, _ in items], [cancel for _, cancel in items])
