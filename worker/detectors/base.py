"""The detector protocol every model implements, and where its weights come from."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from modgate.errors import ConfigError

if TYPE_CHECKING:
    from modgate.settings import Settings
    from worker.ingest.decode import Frame


@dataclass(frozen=True)
class DetectorOutput:
    """Every score a detector computed for one frame, plus optional detail (boxes...)."""

    scores: dict[str, float]
    details: dict[str, Any] | None = field(default=None)


class Detector(ABC):
    """One model. Loaded once per process, then shared by every thread of the batcher."""

    id: ClassVar[str]
    # What the detector consumes: decoded frames, or the shared CLIP backbone's embedding.
    input: ClassVar[Literal["image", "clip_embedding"]] = "image"
    # Both sides of a decoded frame must be at least this many pixels for the detector
    # to see what it would see on a full-size decode; JPEG draft mode stops there.
    min_side: ClassVar[int] = 224
    # Whether JPEG draft decoding keeps this detector within 0.02 of its reference. A
    # detector whose reference resizes without antialiasing sees different pixels on any
    # reduced decode, so it opts out and the pipeline decodes at full size while it runs.
    draft_ok: ClassVar[bool] = True

    model: str
    revision: str

    @classmethod
    @abstractmethod
    def load(cls, settings: Settings) -> Detector:
        """Find the weights and build the model; raise ConfigError naming what was missing."""

    def prepare(self, frame: Frame) -> Any:
        """Per-frame preprocessing (resize, normalise...). The pipeline calls it on the
        decode threads, so it overlaps inference; the batch thread then only runs models."""
        return frame

    def preparer(self) -> Callable[[Frame], Any] | None:
        """``prepare`` as a picklable callable that needs no weights (a module-level
        function, or a ``functools.partial`` of one), so a decode process can run it next
        to decoding and send back only the detector-sized input. None: ``prepare`` runs
        in the worker process, on the decoded frame sent back to it. For the split shape
        the function must be listed in ``worker.detectors.PREPARERS`` and its parameters
        be plain data: ingest processes build it by name (``build_preparer``)."""
        return None

    @abstractmethod
    def infer(self, inputs: Sequence[Any]) -> list[DetectorOutput]:
        """Score a batch of what ``prepare`` returned; one output per input, in order."""

    def predict(self, frames: Sequence[Frame]) -> list[DetectorOutput]:
        """Convenience: prepare and infer in one call."""
        return self.infer([self.prepare(f) for f in frames])


def resolve_weights(
    detector_id: str,
    settings: Settings,
    filename: str,
    packaged: Callable[[], Path | None] | None = None,
) -> Path:
    """Weights path, looked up in order: explicit setting, model directory, packaged copy."""
    looked: list[str] = []
    explicit = settings.detectors.paths.get(detector_id)
    if explicit is not None:
        if explicit.is_dir() and (explicit / filename).is_file():
            return explicit / filename
        if explicit.is_file():
            return explicit
        raise ConfigError(f"{detector_id}: weights path {explicit} (from settings) does not exist")
    if settings.detectors.model_dir is not None:
        candidate = settings.detectors.model_dir / detector_id / filename
        if candidate.is_file():
            return candidate
        looked.append(str(candidate))
    if packaged is not None:
        found = packaged()
        if found is not None and found.is_file():
            return found
        looked.append(str(found) if found is not None else "the file shipped in its Python package")
    raise ConfigError(f"{detector_id}: weights {filename!r} not found; looked in: {'; '.join(looked)}")
