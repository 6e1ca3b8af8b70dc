"""Detector registry. Classes are imported lazily so ``import worker`` stays light."""

from __future__ import annotations

import functools
import importlib
import itertools
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from modgate.errors import ConfigError
from modgate.policy import require_detectors

if TYPE_CHECKING:
    from modgate.settings import Settings
    from worker.detectors.base import Detector
    from worker.detectors.clip_backbone import ClipBackbone

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


# Preprocessing an ingest process of the split shape runs for the inference process's
# detectors, by name: name -> "module:function". The inference process sends a name and
# JSON parameters (``preparer_spec``); nothing it sends chooses code to run in an ingest
# process beyond this table (no pickled callables cross the socket).
PREPARERS: dict[str, str] = {
    "open_nsfw": "worker.detectors.open_nsfw:prepare_frame",
    "nudenet": "worker.detectors.nudenet:prepare_frame",
    "clip": "worker.detectors.clip_backbone:prepare_frame",
    "falconsai_vit": "worker.detectors.falconsai_vit:prepare_frame",
}
# Image processors (transformers) a parameter may name: rebuilt from their JSON config.
_IMAGE_PROCESSORS = ("ViTImageProcessor", "ViTImageProcessorFast")


def _resolve(target: str) -> Callable[..., Any]:
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def preparer_spec(fn: Callable[..., Any] | None) -> dict[str, Any]:
    """A detector's ``preparer()`` (a registered function, or a ``functools.partial`` of one
    with keyword parameters) as ``{"name", "params"}`` that JSON carries; ConfigError when
    it is not one of ``PREPARERS`` or a parameter is not plain data."""
    if fn is None:
        raise ConfigError("no preparer")
    func, params = (fn.func, dict(fn.keywords)) if isinstance(fn, functools.partial) else (fn, {})
    if isinstance(fn, functools.partial) and fn.args:
        raise ConfigError("a preparer takes keyword parameters only")
    target = f"{getattr(func, '__module__', '?')}:{getattr(func, '__qualname__', '?')}"
    name = next((n for n, t in PREPARERS.items() if t == target), None)
    if name is None:
        raise ConfigError(f"{target} is not a registered preparer (worker.detectors.PREPARERS)")
    encoded = {}
    for key, value in params.items():
        if type(value).__name__ in _IMAGE_PROCESSORS and hasattr(value, "to_dict"):
            # Its JSON form (tuples become lists), which is what the other side rebuilds from.
            config = json.loads(json.dumps(value.to_dict()))
            value = {"image_processor": type(value).__name__, "config": config}
        try:
            if json.loads(json.dumps(value)) != value:
                raise ValueError("does not survive JSON")
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{name}: parameter {key!r} is not plain data ({exc})") from None
        encoded[key] = value
    return {"name": name, "params": encoded}


def build_preparer(spec: Any) -> Callable[[Any], Any]:
    """The callable ``preparer_spec`` described, built here from the registry (an ingest
    process: no weights). ValueError for anything not registered or malformed."""
    if not isinstance(spec, dict) or set(spec) != {"name", "params"} or not isinstance(spec["params"], dict):
        raise ValueError(f"malformed preparer {spec!r:.200}")
    name = spec["name"]
    if name not in PREPARERS:
        raise ValueError(f"unknown preparer {name!r:.100}")
    params = {}
    for key, value in spec["params"].items():
        if isinstance(value, dict) and set(value) == {"image_processor", "config"}:
            if value["image_processor"] not in _IMAGE_PROCESSORS or not isinstance(value["config"], dict):
                raise ValueError(f"{name}: image processor {value['image_processor']!r:.100} is not allowed")
            import transformers

            value = getattr(transformers, value["image_processor"]).from_dict(value["config"])
        params[str(key)] = value
    func = _resolve(PREPARERS[name])
    return functools.partial(func, **params) if params else func


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


def resolve_device(setting: str, cuda_available: Callable[[], bool] | None = None) -> str:
    """``runtime.device`` → "cuda" or "cpu"; ``auto`` takes CUDA when torch sees a device.
    ``cuda_available`` replaces torch's answer (tests)."""
    if setting == "cpu":
        return "cpu"
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available
    if cuda_available():
        return "cuda"
    if setting == "cuda":
        raise ConfigError("device=cuda but torch sees no CUDA device")
    return "cpu"


def _tensor_device(value: Any) -> str | None:
    """Device type of a torch module's first weight, or of a dict of tensors; else None."""
    if hasattr(value, "parameters") and hasattr(value, "buffers"):
        tensors: Iterable[Any] = itertools.chain(value.parameters(), value.buffers())
    elif isinstance(value, dict):
        tensors = value.values()
    else:
        return None
    return next((t.device.type for t in tensors if hasattr(t, "device")), None)


def detector_device(detector: Any) -> str:
    """Where a loaded detector computes: the ``device`` it declares, else the device of the
    first torch weights it holds (CLIP heads), else the CPU."""
    declared = getattr(detector, "device", None)
    if declared is not None:
        return str(getattr(declared, "type", declared))
    for value in vars(detector).values():
        found = _tensor_device(value)
        if found is not None:
            return found
    return "cpu"


def check_devices(devices: dict[str, str], resolved: str) -> None:
    """On a CUDA runtime every model must run on the GPU: one that would run anywhere else
    (onnxruntime without its CUDA provider, a head left on the CPU) stops start-up by name
    instead of quietly capping the ensemble at CPU speed."""
    if resolved != "cuda":
        return
    elsewhere = {name: dev for name, dev in devices.items() if dev != "cuda"}
    if elsewhere:
        raise ConfigError(
            "runtime device is cuda but "
            + ", ".join(f"{name} would run on {dev}" for name, dev in sorted(elsewhere.items()))
            + " (an ONNX detector goes on the GPU with runtime.onnx=auto or torch)"
        )


@dataclass
class LoadedDetectors:
    detectors: list[Detector]
    skipped: dict[str, str]  # id -> why
    # Loaded once when any enabled detector consumes CLIP embeddings; shared by all of them.
    backbone: ClipBackbone | None = None

    @property
    def min_side(self) -> int:
        return max((d.min_side for d in self.detectors), default=0)

    def draft_side(self, always: bool = False, full_frames: bool = False) -> int:
        """Smallest side JPEG draft decoding may stop at; 0 = decode at full size (also when
        ``full_frames``: PDQ as ThreatExchange computes it, ``hashing.pdq=full``)."""
        if full_frames:
            return 0
        return self.min_side if always or all(d.draft_ok for d in self.detectors) else 0

    def devices(self) -> dict[str, str]:
        """Detector id → the device it runs on ("cpu", "cuda"), for probes and start-up."""
        return {d.id: detector_device(d) for d in self.detectors}


def load_detectors(settings: Settings) -> LoadedDetectors:
    """Load every enabled detector once. An explicit list (or explicit weights) fails on
    the first that cannot load; the default list skips it and says why."""
    loaded: list[Detector] = []
    skipped: dict[str, str] = {}
    backbone: ClipBackbone | None = None
    backbone_error: str | None = None
    # Resolved once, before any model loads: device=cuda without a GPU stops here.
    device = resolve_device(settings.runtime.device)

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
                # Heads compute where the embeddings are: on a GPU node, on the GPU.
                loaded.append(cls.load(settings, backbone).to(backbone.device))  # type: ignore[call-arg]
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
    policies = {"policy": settings.policy}
    policies.update({f"policy {n!r}": settings.named_policy(n) for n in settings.policies})
    require_detectors(policies, {d.id for d in loaded}, skipped)
    result = LoadedDetectors(loaded, skipped, backbone)
    devices = result.devices()
    if backbone is not None:
        devices["clip backbone"] = backbone.device.type
    # Outside the skip logic above: a detector on the wrong device is fatal in any list.
    check_devices(devices, device)
    return result
