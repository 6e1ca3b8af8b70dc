"""Tensor decode path: the baseline JPEGs of a batch → EXIF-oriented RGB uint8 tensors on
the device, decoded together by ``torchvision.io.decode_jpeg`` (nvJPEG on CUDA,
libjpeg-turbo on CPU).

Every image is first classified from its header alone (``worker.ingest.probe`` + Pillow's
header parse, no pixel decoded): the decode budget (``worker.ingest.decode.check_budget``, the
one budget function of every decode path) runs there, so a bomb is refused before any
decoder runs. What the tensor path does not take — non-JPEG, MPO, CMYK/YCCK, no
end-of-image marker (truncated), progressive or multi-scan, a decoder error — is handed
back as ``Fallback`` and goes through the PIL path for that image only; the batch never fails.
Chosen by ``decode.backend`` (``backend_for``); the pipeline forms the decode batch.
"""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from PIL import Image

from modgate.errors import ModerationError
from worker.ingest.decode import check_budget
from worker.ingest.probe import Probe, probe

if TYPE_CHECKING:
    import torch

    from modgate.settings import DecodeSettings

# torchvision 0.29 deprecates its image codecs in favour of torchcodec (not a dependency
# here); the warning would be issued on every call.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")
# decode_jpeg only reads the compressed bytes, so they are wrapped without a copy.
warnings.filterwarnings("ignore", message="The given buffer is not writable")

# Pillow modes of JPEGs whose torchvision RGB decode is the pixels of Pillow's
# ``convert("RGB")`` (tested bit for bit on CPU). CMYK/YCCK (Adobe's inverted ink) are left
# to Pillow, as nvJPEG's handling of them is not Pillow's.
_TENSOR_MODES = frozenset({"RGB", "L"})
_EOI = b"\xff\xd9"


class Cancellable(Protocol):
    """What ``decode_batch`` reads of a job's cancellation (``worker.pipeline.Cancel``)."""

    @property
    def cancelled(self) -> bool: ...


@dataclass(frozen=True)
class Fallback:
    """This image goes through the PIL path instead; ``reason`` says why (logs, tests)."""

    reason: str


@dataclass(frozen=True)
class Cancelled:
    """The job was cancelled before its image was decoded; nothing was decoded."""


@dataclass(frozen=True)
class Accepted:
    """A header the tensor path takes: the decode's inputs, known before decoding."""

    info: Probe
    orientation: int  # EXIF orientation 1..8 (1 = as stored)
    width: int  # after EXIF orientation, as DecodedImage reports it
    height: int


@dataclass(frozen=True)
class TensorImage:
    """One decoded image: (3, H, W) uint8 RGB on the device, EXIF-oriented, full size,
    laid out (H, W, 3) in memory (channels last)."""

    pixels: torch.Tensor
    width: int
    height: int
    format: str = "JPEG"
    frame_count: int = 1
    # The EXIF orientation ``pixels`` were turned by (1 = as stored): the file's own PDQ
    # (``pdq_file``, ThreatExchange's) is derived from it (worker.device.pdq_tensor).
    orientation: int = 1


Outcome = TensorImage | Fallback | Cancelled | ModerationError


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _cpu_pool(workers: int) -> ThreadPoolExecutor:
    with _POOLS_LOCK:
        pool = _POOLS.get(workers)
        if pool is None:
            pool = _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="modgate-jpeg")
        return pool


def backend_for(setting: str, device: str) -> str:
    """``decode.backend`` for a resolved torch device type: auto = tensor on CUDA only."""
    if setting == "auto":
        return "tensor" if device == "cuda" else "pil"
    return setting


def _head(data: bytes) -> bytes:
    """The markers up to and including the start-of-scan segment: all Pillow reads to
    open a JPEG. ``data`` may be any buffer (a mapped file from an ingest process): only
    this part is copied for Pillow, never the whole image."""
    if isinstance(data, bytes):
        return data  # BytesIO shares a bytes object without copying
    n, pos = len(data), 2
    while pos + 4 <= n and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF or 0xD0 <= marker <= 0xD8 or marker == 0x01:
            pos += 1 if marker == 0xFF else 2
            continue
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA:  # start of scan: the header ends with its segment
            return bytes(data[: end + 2])
        pos = end
    return bytes(data)


def classify(data: bytes, settings: DecodeSettings) -> Accepted | Fallback:
    """Decide from the header whether the tensor path takes ``data``. Raises the budget's
    ModerationError (image_too_large / image_too_complex) before anything is decoded."""
    if not data:
        return Fallback("empty")
    info = probe(data)
    if info.format != "JPEG":
        return Fallback(f"format {info.format or 'unknown'}")
    check_budget(info, settings)  # a scan bomb too: refused by its scan count
    if not info.baseline_jpeg:
        # Progressive or multi-scan: each scan is another pass over the whole image, so the
        # cost is not bounded by the pixels, and a decode here (the batch thread, or the
        # inference process) cannot be stopped mid-call. A decode process's hard time limit
        # can; nvJPEG's hardware and batched decoders are for baseline Huffman JPEGs anyway.
        return Fallback("progressive or multi-scan JPEG")
    try:
        im = Image.open(io.BytesIO(_head(data)))  # reads the header only
    except Exception as exc:
        return Fallback(f"header: {type(exc).__name__}")
    if im.format != "JPEG":
        return Fallback(f"Pillow reads it as {im.format}")  # MPO: Pillow's rules for its frames
    if im.mode not in _TENSOR_MODES:
        return Fallback(f"mode {im.mode}")
    w0, h0 = im.size
    # What Pillow saw, as decode_image checks it: a canvas larger than the probe read.
    check_budget(Probe("JPEG", max(w0, info.width), max(h0, info.height), 1), settings)
    if w0 == 0 or h0 == 0:
        return Fallback("zero size")
    # Cut short, without EOI: Pillow and torchvision's CPU decoder both refuse it, but
    # nvJPEG's behaviour is not specified, so it goes to Pillow, whose error verdict
    # (corrupt_image) is the reference. (A damaged scan that still ends in EOI decodes
    # with grey fill in Pillow and libjpeg alike: the same pixels either way.)
    if not bytes(data[-4096:]).rstrip(b"\x00\r\n ").endswith(_EOI):
        return Fallback("no end-of-image marker")
    try:
        orientation = int(im.getexif().get(0x0112, 1))
    except Exception:
        return Fallback("unreadable EXIF")
    if orientation not in range(1, 9):
        orientation = 1  # Pillow's exif_transpose ignores unknown values too
    w, h = (h0, w0) if orientation in (5, 6, 7, 8) else (w0, h0)
    return Accepted(info, orientation, w, h)


def orient(pixels: torch.Tensor, orientation: int) -> torch.Tensor:
    """(C, H, W) as stored → as displayed; Pillow's ``ImageOps.exif_transpose`` mapping."""
    import torch

    if orientation == 2:
        return pixels.flip(2)
    if orientation == 3:
        return pixels.flip(1, 2)
    if orientation == 4:
        return pixels.flip(1)
    if orientation == 5:
        return pixels.transpose(1, 2)
    if orientation == 6:
        return torch.rot90(pixels, -1, (1, 2))  # 90° clockwise (Pillow ROTATE_270)
    if orientation == 7:
        return pixels.transpose(1, 2).flip(1, 2)
    if orientation == 8:
        return torch.rot90(pixels, 1, (1, 2))  # 90° counter-clockwise (Pillow ROTATE_90)
    return pixels


def _channels_last(pixels: torch.Tensor) -> torch.Tensor:
    """(3, H, W) whose memory is (H, W, 3), as decode_jpeg returns it: the layout the
    preprocessing's row gathers and torch's uint8 antialiased resize are fast on. Only a
    rotated or flipped image is copied."""
    hwc = pixels.permute(1, 2, 0)
    return pixels if hwc.is_contiguous() else hwc.contiguous().permute(2, 0, 1)


def decode_batch(
    datas: Sequence[bytes],
    settings: DecodeSettings,
    device: torch.device | str = "cpu",
    cancels: Sequence[Cancellable | None] | None = None,
) -> list[Outcome]:
    """One outcome per input, in order: a TensorImage, a Fallback to the PIL path, the
    budget's ModerationError (an error verdict for that image), or Cancelled. Never raises
    for one image's sake."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    dev = torch.device(device)
    outcomes: list[Outcome] = [Fallback("not classified")] * len(datas)
    accepted: list[tuple[int, Accepted]] = []
    for i, data in enumerate(datas):
        cancel = cancels[i] if cancels is not None else None
        if cancel is not None and cancel.cancelled:
            outcomes[i] = Cancelled()
            continue
        try:
            verdict = classify(data, settings)
        except ModerationError as exc:
            outcomes[i] = exc
            continue
        except Exception as exc:  # a hostile header must not fail the batch
            outcomes[i] = Fallback(f"classify: {type(exc).__name__}")
            continue
        if isinstance(verdict, Fallback):
            outcomes[i] = verdict
        else:
            accepted.append((i, verdict))
    if not accepted:
        return outcomes
    raw = [torch.frombuffer(datas[i], dtype=torch.uint8) for i, _ in accepted]

    def one(tensor: torch.Tensor) -> Any:
        try:
            return decode_jpeg(tensor, mode=ImageReadMode.RGB, device=dev)
        except Exception as exc:
            return Fallback(f"decode_jpeg: {type(exc).__name__}: {str(exc)[:80]}")

    decoded: list[Any]
    if dev.type == "cpu":
        # libjpeg decodes one image per call, without the GIL: spread them over the
        # decode threads, as the PIL path does, instead of serialising the batch.
        decoded = list(_cpu_pool(settings.workers).map(one, raw)) if len(raw) > 1 else [one(raw[0])]
    else:
        try:
            decoded = list(decode_jpeg(raw, mode=ImageReadMode.RGB, device=dev))
        except Exception:
            # nvJPEG returns nothing when one image of the batch fails: one by one.
            decoded = [one(tensor) for tensor in raw]
    for (i, acc), pixels in zip(accepted, decoded, strict=True):
        if isinstance(pixels, Fallback):
            outcomes[i] = pixels
            continue
        stored = (acc.width, acc.height) if acc.orientation < 5 else (acc.height, acc.width)
        if tuple(pixels.shape) != (3, stored[1], stored[0]):
            outcomes[i] = Fallback(f"decoded shape {tuple(pixels.shape)} is not the header's")
            continue
        oriented = _channels_last(orient(pixels, acc.orientation))
        outcomes[i] = TensorImage(oriented, acc.width, acc.height, orientation=acc.orientation)
    return outcomes
