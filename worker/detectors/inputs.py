"""Batches of detector inputs, whichever path prepared them: numpy arrays from the PIL path,
torch tensors (already on their device) from the tensor decode path, or a mix of both when
a tensor batch holds fallback frames. Detectors and the device side share these. This
module imports torch: callers on the PIL path stack their numpy arrays themselves and
import it only once a tensor is among the inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Host → device: from pinned memory, non-blocking, on CUDA; a no-op on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def stack_inputs(inputs: Sequence[Any]) -> Any:
    """Stack per-frame inputs into a batch: ``torch.stack`` for tensors (they stay on their
    device), ``np.stack`` for the PIL path's arrays; a mix (fallback frames in a tensor
    batch) goes to the tensors' device."""
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    if not tensors:
        return np.stack(inputs)
    device = tensors[0].device
    return torch.stack(
        [x if isinstance(x, torch.Tensor) else to_device(torch.as_tensor(x), device) for x in inputs]
    )


def cat_inputs(inputs: Sequence[Any]) -> Any:
    """``stack_inputs`` for inputs that already carry a batch axis (nudenet's blobs)."""
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    if not tensors:
        return np.concatenate(inputs)
    device = tensors[0].device
    return torch.cat(
        [x if isinstance(x, torch.Tensor) else to_device(torch.as_tensor(x), device) for x in inputs]
    )
