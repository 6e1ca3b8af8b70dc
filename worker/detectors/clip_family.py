"""The CLIP detector family: heads that score the shared backbone's embedding.

Every head declares the embedding space it was trained in; ``load`` refuses, with a
message naming both, to put a head on a backbone that serves another space.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from modgate.errors import ConfigError
from worker.detectors.base import Detector, DetectorOutput

if TYPE_CHECKING:
    from modgate.settings import Settings
    from worker.detectors.clip_backbone import ClipBackbone

OPENAI_L14 = "openai/ViT-L-14"


class ClipHead(Detector):
    input = "clip_embedding"
    min_side = 224
    space: ClassVar[str] = OPENAI_L14
    score_names: tuple[str, ...]

    def __init__(
        self, module: torch.nn.Module, model: str, revision: str, score_names: Sequence[str]
    ) -> None:
        self.module = module
        self.model = model
        self.revision = revision
        self.score_names = tuple(score_names)

    @classmethod
    def check_backbone(cls, backbone: ClipBackbone | None, dim: int) -> ClipBackbone:
        if backbone is None:
            raise ConfigError(f"{cls.id}: needs the CLIP backbone, which is not loaded")
        if backbone.dim != dim:
            raise ConfigError(
                f"{cls.id}: trained on {dim}-d {cls.space} embeddings; "
                f"the backbone ({backbone.source}) gives {backbone.dim}-d ones"
            )
        if backbone.space != cls.space:
            raise ConfigError(
                f"{cls.id}: refusing to run a head trained on {cls.space} embeddings on a backbone serving "
                f"{backbone.space or 'an unknown space'} (projection fingerprint {backbone.fingerprint}); "
                f"if that checkpoint is {cls.space}, set detectors.backbone_space={cls.space!r}"
            )
        return backbone

    def to(self, device: torch.device) -> ClipHead:
        """Put the head's weights where the backbone's embeddings are (the GPU on a GPU node)."""
        self.module = self.module.to(device)
        return self

    def infer(self, inputs: Sequence[torch.Tensor]) -> list[DetectorOutput]:
        with torch.inference_mode():
            scores = self.module(torch.stack(list(inputs))).float().cpu().numpy()
        return [DetectorOutput(dict(zip(self.score_names, map(float, row), strict=True))) for row in scores]


def _file_revision(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


class FileHead(ClipHead):
    """A head built from one original file: resolve it, build the module, check the backbone."""

    FILE: ClassVar[str]
    MODEL: ClassVar[str]

    @classmethod
    def build(cls, path: Path) -> tuple[torch.nn.Module, int, Sequence[str]]:
        """(module, embedding width it expects, score names) from the weights file."""
        raise NotImplementedError

    @classmethod
    def load(cls, settings: Settings, backbone: ClipBackbone | None = None) -> FileHead:
        from worker.detectors.weights import resolve_or_fetch

        path = resolve_or_fetch(cls.id, settings, cls.FILE)
        module, dim, names = cls.build(path)
        cls.check_backbone(backbone, dim)
        return cls(module, cls.MODEL, _file_revision(path), names)


class LaionNSFW(FileHead):
    id = "laion_nsfw"
    FILE = "clip_autokeras_binary_nsfw.zip"
    MODEL = "LAION-AI/CLIP-based-NSFW-Detector"

    @classmethod
    def build(cls, path: Path) -> tuple[torch.nn.Module, int, Sequence[str]]:
        from worker.detectors.laion_nsfw import load_laion_nsfw

        head = load_laion_nsfw(path)
        # LAION feeds L2-normalised embeddings (clip-retrieval normalises before predict).
        return _Unsqueeze(torch.nn.Sequential(_Normalize(), head)), head.dim, ("nsfw",)


class Q16(FileHead):
    id = "q16"
    FILE = "prompts_vit_l_14.p"
    MODEL = "ml-research/Q16"

    @classmethod
    def build(cls, path: Path) -> tuple[torch.nn.Module, int, Sequence[str]]:
        from worker.detectors.clip_heads import SCORE_NAMES, load_q16

        head = load_q16(path)
        return head, head.dim, SCORE_NAMES["q16"]


class LaionViolence(FileHead):
    id = "laion_violence"
    FILE = "violence_detection_vit_l_14.npy"
    MODEL = "LAION-AI/CLIP-based-NSFW-Detector violence"

    @classmethod
    def build(cls, path: Path) -> tuple[torch.nn.Module, int, Sequence[str]]:
        from worker.detectors.clip_heads import SCORE_NAMES, load_violence

        head = load_violence(path)
        return head, head.dim, SCORE_NAMES["laion_violence"]


class MultiHeaded(FileHead):
    id = "multiheaded"
    FILE = "sexual.pt"  # one of five in the same folder; the folder is what loads
    MODEL = "YitingQu/unsafe-diffusion MultiHeaded"

    @classmethod
    def build(cls, path: Path) -> tuple[torch.nn.Module, int, Sequence[str]]:
        from worker.detectors.clip_heads import load_multiheaded

        heads = load_multiheaded(path.parent)
        return heads, heads.dim, heads.names


class _Normalize(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / x.norm(dim=-1, keepdim=True)


class _Unsqueeze(torch.nn.Module):
    """(N,) → (N, 1), so single-score heads fit ``ClipHead.infer``."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> Any:
        return self.inner(x).unsqueeze(-1)
