"""``sd_safety_checker``: the CompVis Stable Diffusion safety checker on the shared
backbone, computed exactly as diffusers' ``StableDiffusionSafetyChecker.forward``:
cosine to 17 concept and 3 special-care embeddings minus each one's threshold, rounded
to 3 decimals, with 0.01 added to every later score once a special-care concept fires.
All 20 scores go into the verdict; ``nsfw`` is 1.0 when any concept score is above 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from modgate.errors import ConfigError
from worker.detectors.base import DetectorOutput
from worker.detectors.clip_backbone import fingerprint, locate_checkpoint, read_state_dict
from worker.detectors.clip_family import ClipHead

if TYPE_CHECKING:
    from modgate.settings import Settings
    from worker.detectors.clip_backbone import ClipBackbone

SPECIAL_ADJUSTMENT = 0.01


def safety_scores(
    image_embeds: torch.Tensor,
    concept_embeds: torch.Tensor,
    concept_thresholds: torch.Tensor,
    special_embeds: torch.Tensor,
    special_thresholds: torch.Tensor,
) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3) special scores and (N, 17) concept scores, float32, as diffusers computes them."""
    image = torch.nn.functional.normalize(image_embeds.float())
    special_cos = (image @ torch.nn.functional.normalize(special_embeds.float()).T).cpu().numpy()
    concept_cos = (image @ torch.nn.functional.normalize(concept_embeds.float()).T).cpu().numpy()
    special_thr = [float(t) for t in special_thresholds.tolist()]
    concept_thr = [float(t) for t in concept_thresholds.tolist()]
    special = np.empty_like(special_cos)
    concept = np.empty_like(concept_cos)
    for i in range(image.shape[0]):
        adjustment = 0.0
        for j, threshold in enumerate(special_thr):
            # float32 - python float stays float32, exactly as in diffusers' per-element loop
            special[i, j] = round(special_cos[i, j] - threshold + adjustment, 3)
            if special[i, j] > 0:
                adjustment = SPECIAL_ADJUSTMENT
        for j, threshold in enumerate(concept_thr):
            concept[i, j] = round(concept_cos[i, j] - threshold + adjustment, 3)
    return special, concept


class SDSafetyChecker(ClipHead):
    id = "sd_safety_checker"

    def __init__(self, buffers: dict[str, torch.Tensor], revision: str) -> None:
        super().__init__(torch.nn.Identity(), "CompVis/stable-diffusion-safety-checker", revision, ())
        self.buffers = buffers

    @classmethod
    def load(cls, settings: Settings, backbone: ClipBackbone | None = None) -> SDSafetyChecker:
        info = locate_checkpoint(settings, keys=(cls.id,))
        if info.kind != "sd_safety_checker":
            raise ConfigError(f"{cls.id}: {info.path} is not a StableDiffusionSafetyChecker checkpoint")
        state = read_state_dict(info.path)
        keys = (
            "concept_embeds",
            "concept_embeds_weights",
            "special_care_embeds",
            "special_care_embeds_weights",
        )
        missing = [k for k in keys if k not in state]
        if missing:
            raise ConfigError(f"{cls.id}: {info.path} lacks {', '.join(missing)}")
        if backbone is None:
            raise ConfigError(f"{cls.id}: needs the CLIP backbone, which is not loaded")
        # The concept embeddings live in this checkpoint's projection space: only that exact
        # projection may feed them.
        own = fingerprint(state["visual_projection.weight"])
        if backbone.fingerprint != own:
            raise ConfigError(
                f"{cls.id}: its concept embeddings need the projection {own} of {info.path}; the backbone "
                f"({backbone.source}) has {backbone.fingerprint}"
            )
        return cls({k: state[k].float() for k in keys}, own)

    def to(self, device: torch.device) -> SDSafetyChecker:
        self.buffers = {k: v.to(device) for k, v in self.buffers.items()}
        return self

    def infer(self, inputs: Sequence[torch.Tensor]) -> list[DetectorOutput]:
        b = self.buffers
        special, concept = safety_scores(
            torch.stack(list(inputs)),
            b["concept_embeds"],
            b["concept_embeds_weights"],
            b["special_care_embeds"],
            b["special_care_embeds_weights"],
        )
        outputs = []
        for s_row, c_row in zip(special, concept, strict=True):
            scores = {f"special_{j}": float(v) for j, v in enumerate(s_row)}
            scores.update({f"concept_{j:02d}": float(v) for j, v in enumerate(c_row)})
            scores["nsfw"] = 1.0 if (c_row > 0).any() else 0.0
            scores["special_care"] = 1.0 if (s_row > 0).any() else 0.0
            outputs.append(DetectorOutput(scores))
        return outputs
