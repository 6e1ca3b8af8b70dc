"""``falconsai_vit``: Falconsai/nsfw_image_detection, a ViT-B/16 image classifier with
labels ``normal`` / ``nsfw``, run through transformers (its own image processor, then
one batched forward pass). Scores are the softmax over its labels, as the
``image-classification`` pipeline reports them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from modgate.errors import ConfigError
from worker.detectors.base import Detector, DetectorOutput

if TYPE_CHECKING:
    from modgate.settings import Settings
    from worker.ingest.decode import Frame

HUB_REPO = "Falconsai/nsfw_image_detection"


def _local_dir(settings: Settings) -> Path | None:
    explicit = settings.detectors.paths.get("falconsai_vit")
    if explicit is not None:
        if not (explicit / "config.json").is_file():
            raise ConfigError(f"falconsai_vit: {explicit} (from settings) has no config.json")
        return explicit
    if (
        settings.detectors.model_dir is not None
        and (settings.detectors.model_dir / "falconsai_vit" / "config.json").is_file()
    ):
        return settings.detectors.model_dir / "falconsai_vit"
    return None


def prepare_frame(frame: Frame, processor: Any) -> torch.Tensor:
    return processor(images=frame.image, return_tensors="pt")["pixel_values"][0]


class FalconsaiViT(Detector):
    id = "falconsai_vit"
    min_side = 224

    def __init__(self, model: Any, processor: Any, source: str, device: torch.device) -> None:
        self.net = model.eval().to(device)
        self.processor = processor
        self.device = device
        self.labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        self.model = HUB_REPO
        self.revision = source

    @classmethod
    def load(cls, settings: Settings) -> FalconsaiViT:
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        from worker.detectors.clip_backbone import torch_device

        local = _local_dir(settings)
        source: str | Path = local if local is not None else HUB_REPO
        # The default detector set never downloads at start-up (an unreachable hub costs
        # half a minute of retries): it uses local copies and the HF cache; `modgate models
        # pull`, or enabling the detector explicitly, fetches from the hub.
        online = local is None and settings.detectors.strict
        kwargs: dict[str, Any] = {} if online else {"local_files_only": True}
        if local is None:
            from worker.detectors.weights import SPECS

            kwargs["revision"] = SPECS["falconsai_vit"].revision(settings)
        try:
            model = AutoModelForImageClassification.from_pretrained(source, **kwargs)
            processor = AutoImageProcessor.from_pretrained(source, **kwargs)
        except OSError as exc:
            looked = (
                str(local)
                if local is not None
                else "settings path, model dir, HF cache" + (", hub" if online else "")
            )
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(
                f"falconsai_vit: cannot load {source} (looked in: {looked}): {reason}"
            ) from None
        return cls(model, processor, str(source), torch_device(settings))

    def prepare(self, frame: Frame) -> torch.Tensor:
        return prepare_frame(frame, self.processor)

    def preparer(self) -> Callable[[Frame], torch.Tensor]:
        """``prepare`` for a decode process: the image processor pickles without the model."""
        return functools.partial(prepare_frame, processor=self.processor)

    def infer(self, inputs: Sequence[torch.Tensor]) -> list[DetectorOutput]:
        with torch.inference_mode():
            # A batch can mix host inputs (PIL path) with device ones (tensor path).
            pixels = torch.stack([torch.as_tensor(x).to(self.device, non_blocking=True) for x in inputs])
            logits = self.net(pixel_values=pixels).logits
            probs = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        return [DetectorOutput(dict(zip(self.labels, map(float, row), strict=True))) for row in probs]
