"""PDQ of a frame the tensor path decoded, without bringing the frame to the host: PDQ's
own downsample (two box-filter passes per axis, then 64×64 samples: see
``worker.ingest.hashing.pdq_axis_weights``) runs where the frame is, as two matrix
products, and only the 64×64 luma buffer (32 KiB) is copied to the host and hashed there.

The result is ThreatExchange's hash of the full decode (the same bits on every image
measured, bench/results/hashing.json), like the PIL path's ``pdq_hash``; the host's share is
the DCT and the bits (~0.3 core-ms), whatever the frame's size. On the CPU the frame is on
the host already: ``pdq_hash`` reads it in place, exactly as the PIL path hashes a frame.
A frame turned by its EXIF orientation is also hashed as the file stores it (``pdq_file``,
ThreatExchange's hash of the file): the same products with the weights reordered
(``hashing.pdq_stored_weights``), on the displayed frame, no copy of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from worker.ingest.hashing import pdq_file_hash, pdq_from_buffer64, pdq_hash, pdq_stored_weights

if TYPE_CHECKING:
    import torch

_LUMA = (0.299, 0.587, 0.114)


def pdq_of_tensor(pixels: torch.Tensor, orientation: int = 1) -> tuple[str, int]:
    """(PDQ hex, quality) of a (3, H, W) uint8 RGB frame on any device (as
    ``decode_tensor.TensorImage.pixels``: EXIF-oriented, full size). With the EXIF
    ``orientation`` the frame was turned by (other than 1): the PDQ of the pixels as the
    file stores them, ThreatExchange's hash of the file."""
    _, h, w = pixels.shape
    if pixels.device.type == "cpu" or min(h, w) < 64:
        # On the host already (or tiny): the PIL path's own hash, on a view of the frame.
        rgb = _host_hwc(pixels)
        return pdq_hash(rgb) if orientation == 1 else pdq_file_hash(rgb, orientation)
    return pdq_from_buffer64(device_buffer64(pixels, orientation))


def device_buffer64(pixels: torch.Tensor, orientation: int = 1) -> np.ndarray:
    """PDQ's 64×64 luma buffer of a (3, H, W) uint8 frame, computed on its device: per
    channel ``R @ channel @ C.T`` in float64 (never TF32, whatever the process's matmul
    precision), summed with PDQ's luma weights; 64×64 float64 on the host. ``R`` and ``C``
    are PDQ's axis weights, reordered for an EXIF ``orientation`` other than 1 so that the
    buffer is that of the pixels as stored (``hashing.pdq_stored_weights``)."""
    import torch

    _, h, w = pixels.shape
    rows_np, cols_np, transposed = pdq_stored_weights(h, w, orientation)
    # Copies (the cache is read-only, and a reversed view has negative strides): 64×(H+W).
    rows = torch.tensor(np.ascontiguousarray(rows_np), device=pixels.device)
    cols = torch.tensor(np.ascontiguousarray(cols_np), device=pixels.device)
    out = torch.zeros((64, 64), dtype=torch.float64, device=pixels.device)
    for channel, weight in enumerate(_LUMA):
        # One channel at a time: the float64 copy is H×W×8 bytes, not three of them.
        out += weight * ((rows @ pixels[channel].to(torch.float64)) @ cols.T)
    return (out.T if transposed else out).cpu().numpy()


def _host_hwc(pixels: torch.Tensor) -> np.ndarray:
    """(H, W, 3) uint8 on the host: a view when the frame is on the CPU in the channels-last
    layout decode_tensor gives it, else one copy."""
    return np.ascontiguousarray(pixels.permute(1, 2, 0).cpu().numpy())
