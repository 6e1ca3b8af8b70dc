"""Detector registry. Classes are imported lazily so ``import worker`` stays light."""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from worker.errors import ConfigError

if TYPE_CHECKING:
    from worker.detectors.base import Detector
    from worker.detectors.clip_backbone import ClipBackbone
    from worker.settings import Settings

log = logging.getLogger(__name__)

# Public loaders for the heads that come from original files; imported on first use so
# that importing this package does not import torch.
_LOADERS = {
    "load_laion_nsfw": "worker.detectors.laion_nsfw",
    "load_q16": "worker.detectors.clip_heads",
    "load_multiheaded": "worker.detectors.clip_heads",
    "load_violence": "worker.detectors.clip_heads",
}


def __getattr__(name: str):  # type: ignore[no-untyped-def]
    if name in _LOADERS:
        return getattr(importlib.import_module(_LOADERS[name]), name)
    raise AttributeError(name)


# id -> "module:Class"
REGISTRY: dict[str, str] = {
    "open_nsfw": "worker.detectors.open_nsfw:OpenNSFW",
    "nudenet": "worker.detectors.nudenet:NudeNet",
    "sd_safety_checker": "worker.detectors.sd_safety_checker:SDSafetyChecker",
    "laion_nsfw": "worker.detectors.clip_family:LaionNSFW",
    "q16": "worker.detectors.clip_family:Q16",
    "multiheaded": "worker.detectors.clip_family:MultiHeaded",
    "laion_violence": "worker.detectors.clip_family:LaionViolence",
    "falconsai_vit": "worker.detectors.falconsai_vit:FalconsaiViT",
    "clip_zeroshot": "worker.detectors.clip_zeroshot:ClipZeroShot",
}


def detector_class(detector_id: str) -> type[Detector]:
    try:
        target = REGISTRY[detector_id]
    except KeyError:
        raise ConfigError(f"unknown detector {detector_id!r}; known: {', '.join(sorted(REGISTRY))}") from None
    module_name, _, cls_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"{detector_id}: cannot import its runtime ({exc}); is its extra installed?"
        ) from exc
    return getattr(module, cls_name)


@dataclass
class LoadedDetectors:
    detectors: list[Detector]
    skipped: dict[str, str]  # id -> why
    # Loaded once when any enabled detector consumes CLIP embeddings; shared by all of them.
    backbone: ClipBackbone | None = None

    @property
    def min_side(self) -> int:
        return max((d.min_side for d in self.detectors), default=0)

    def draft_side(self, always: bool = False) -> int:
        """Smallest side JPEG draft decoding may stop at; 0 = decode at full size."""
        return self.min_side if always or all(d.draft_ok for d in self.detectors) else 0


def load_detectors(settings: Settings) -> LoadedDetectors:
    """Load every enabled detector once. An explicit list (or explicit weights) fails on
    the first that cannot load; the default list skips it and says why."""
    loaded: list[Detector] = []
    skipped: dict[str, str] = {}
    backbone: ClipBackbone | None = None
    backbone_error: str | None = None

    def strict(detector_id: str) -> bool:
        # Naming a detector, or its weights, is asking for it: failing to load it is fatal.
        return settings.detectors.strict or detector_id in settings.detectors.paths

    for detector_id in settings.detectors.ids():
        try:
            cls = detector_class(detector_id)
            if cls.input == "clip_embedding":
                if backbone is None and backbone_error is None:
                    from worker.detectors.clip_backbone import ClipBackbone

                    try:
                        backbone = ClipBackbone.load(settings)
                    except ConfigError as exc:
                        backbone_error = str(exc)
                if backbone is None:
                    raise ConfigError(f"{detector_id}: {backbone_error}")
                loaded.append(cls.load(settings, backbone))  # type: ignore[call-arg]
            else:
                loaded.append(cls.load(settings))
        except ConfigError as exc:
            if strict(detector_id):
                raise
            skipped[detector_id] = str(exc)
            log.warning("detector %s skipped: %s", detector_id, exc)
    if not loaded:
        raise ConfigError(
            "no detector could be loaded: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())
        )
    if backbone is not None and not any(d.input == "clip_embedding" for d in loaded):
        backbone = None  # every head was skipped: do not run the tower for nothing
    return LoadedDetectors(loaded, skipped, backbone)
