"""``nudenet``: the NudeNet 3 part detector (YOLOv8n at 320 px), from the ONNX file inside
the optional ``nudenet`` wheel (AGPL-3.0, hence an extra). Pre- and post-processing
reproduce ``nudenet.NudeDetector.detect`` exactly, but a whole batch goes through one run
of the graph (onnxruntime on CPU, the torch module converted from the same file on CUDA:
``runtime.onnx``, see onnx_torch.py) and the confidence filter is vectorised.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from modgate.detector_scores import NUDENET_LABELS
from modgate.errors import ConfigError
from worker.detectors.base import Detector, DetectorOutput, resolve_weights
from worker.detectors.onnx_torch import OnnxModel, load_onnx_model

if TYPE_CHECKING:
    from modgate.settings import Settings
    from worker.ingest.decode import Frame

INPUT_SIZE = 320
SCORE_THRESHOLD = 0.2
NMS_SCORE_THRESHOLD = 0.25
NMS_IOU_THRESHOLD = 0.45

# NudeNet 3's 18 classes in its output order; the one list, shared with the light table
# of declared scores that policies are checked against.
LABELS = NUDENET_LABELS
# Exposed parts that make an image sexual content. Exposed bellies, feet, armpits and
# male chests are ordinary in beach, sport and family photos, so they do not count.
SEXUAL_LABELS = frozenset(
    {
        "FEMALE_GENITALIA_EXPOSED",
        "MALE_GENITALIA_EXPOSED",
        "FEMALE_BREAST_EXPOSED",
        "BUTTOCKS_EXPOSED",
        "ANUS_EXPOSED",
    }
)

_EXTRA_MISSING = (
    "nudenet: the optional 'nudenet' extra is not installed (AGPL-3.0): pip install 'modgate[nudenet]'"
)


def _packaged_model() -> Path | None:
    spec = importlib.util.find_spec("nudenet")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "320n.onnx"


def preprocess(images: Sequence[np.ndarray]) -> np.ndarray:
    """RGB uint8 arrays → the model's (N, 3, 320, 320) input.

    NudeNet reads BGR with OpenCV, then applies COLOR_RGBA2BGR (which on three channels
    swaps them to RGB), pads bottom/right to a square and lets blobFromImage swap again,
    so the network sees BGR. Starting from RGB we are already at the post-swap step."""
    import cv2

    padded = []
    for rgb in images:
        h, w = rgb.shape[:2]
        side = max(h, w)
        padded.append(cv2.copyMakeBorder(rgb, 0, side - h, 0, side - w, cv2.BORDER_CONSTANT))
    return cv2.dnn.blobFromImages(
        padded, 1 / 255.0, (INPUT_SIZE, INPUT_SIZE), (0, 0, 0), swapRB=True, crop=False
    )


def postprocess(output: np.ndarray, width: int, height: int, scale: float = 1.0) -> list[dict[str, Any]]:
    """One image's raw output (22, 2100) → detections, as NudeNet computes them, in the
    coordinates of the original image (``scale`` = decoded width / original width)."""
    import cv2

    rows = output.T  # (2100, 22): cx, cy, w, h, 18 class scores
    class_scores = rows[:, 4:]
    best = class_scores.max(axis=1)
    keep = np.nonzero(best >= SCORE_THRESHOLD)[0]
    if keep.size == 0:
        return []
    side = max(width, height)
    x_span, y_span = side, side  # original size + padding, as in the reference
    boxes: list[list[float]] = []
    scores: list[float] = []
    class_ids: list[int] = []
    # float32 scalar arithmetic in the reference's order, so boxes match it bit for bit.
    for i in keep:
        cx, cy, w, h = rows[i, 0], rows[i, 1], rows[i, 2], rows[i, 3]
        x = cx - w / 2
        y = cy - h / 2
        x = x * x_span / INPUT_SIZE
        y = y * y_span / INPUT_SIZE
        w = w * x_span / INPUT_SIZE
        h = h * y_span / INPUT_SIZE
        x = max(0, min(x, width))
        y = max(0, min(y, height))
        w = min(w, width - x)
        h = min(h, height - y)
        boxes.append([x, y, w, h])
        scores.append(best[i])
        class_ids.append(int(class_scores[i].argmax()))
    indices = cv2.dnn.NMSBoxes(boxes, scores, NMS_SCORE_THRESHOLD, NMS_IOU_THRESHOLD)
    detections = []
    for i in indices:
        x, y, w, h = boxes[i]
        if scale != 1.0:
            x, y, w, h = x / scale, y / scale, w / scale, h / scale
        detections.append(
            {
                "class": LABELS[class_ids[i]],
                "score": float(scores[i]),
                "box": [int(x), int(y), int(w), int(h)],
            }
        )
    return detections


def scores_from(detections: list[dict[str, Any]]) -> dict[str, float]:
    scores = dict.fromkeys(LABELS, 0.0)
    for det in detections:
        scores[det["class"]] = max(scores[det["class"]], det["score"])
    scores["sexual"] = max(scores[label] for label in SEXUAL_LABELS)
    return scores


def prepare_frame(frame: Frame) -> tuple[np.ndarray, int, int, float]:
    """``NudeNet.prepare`` without the detector: what a decode process runs."""
    width, height = frame.image.size
    return preprocess([np.asarray(frame.image)]), width, height, frame.scale


class NudeNet(Detector):
    id = "nudenet"
    min_side = INPUT_SIZE
    # NudeNet's cv2 INTER_LINEAR resize point-samples the full-size image and its boxes
    # are cut at 0.2/0.25 confidence: on draft-decoded pixels boxes appear or vanish
    # (measured: scores jump by up to 0.29 on 1 image in 10), so it takes full decodes.
    draft_ok = False

    def __init__(self, graph: OnnxModel, revision: str) -> None:
        self.graph = graph
        self.device = graph.device
        self.model = "notAI-tech/NudeNet 320n"
        self.revision = revision

    @classmethod
    def load(cls, settings: Settings) -> NudeNet:
        if importlib.util.find_spec("nudenet") is None and cls.id not in settings.detectors.paths:
            raise ConfigError(_EXTRA_MISSING)
        if importlib.util.find_spec("cv2") is None:
            raise ConfigError(_EXTRA_MISSING)
        path = resolve_weights(cls.id, settings, "320n.onnx", packaged=_packaged_model)
        try:
            version = importlib.metadata.version("nudenet")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        # fp32 whatever runtime.precision says: the 0.2/0.25 confidence cutoffs turn bf16
        # rounding into boxes that appear or vanish (measured on CPU: 1 generated scene in
        # 40 gained a box, its score 0 → 0.25), and YOLOv8n at 320 px is cheap in fp32.
        return cls(load_onnx_model(path, settings, precision="fp32"), f"nudenet-{version}+{digest}")

    def run(self, batch: Any) -> np.ndarray:
        """Model only: (N, 3, 320, 320) → (N, 22, 2100)."""
        return self.graph.run(batch)

    def prepare(self, frame: Frame) -> tuple[np.ndarray, int, int, float]:
        return prepare_frame(frame)

    def preparer(self) -> Callable[[Frame], tuple[np.ndarray, int, int, float]]:
        return prepare_frame

    def infer(self, inputs: Sequence[tuple[np.ndarray, int, int, float]]) -> list[DetectorOutput]:
        blobs = [blob for blob, *_ in inputs]
        if all(isinstance(b, np.ndarray) for b in blobs):
            raw = self.run(np.concatenate(blobs))
        else:  # the tensor decode path's blobs stay on their device
            from worker.detectors.inputs import cat_inputs

            raw = self.run(cat_inputs(blobs))
        outputs = []
        for (_, width, height, scale), out in zip(inputs, raw, strict=True):
            detections = postprocess(out, width, height, scale)
            outputs.append(DetectorOutput(scores_from(detections), {"detections": detections}))
        return outputs
