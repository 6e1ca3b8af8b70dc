"""The shared CLIP image tower: one forward pass per image feeds every CLIP head.

Weights come from a transformers CLIP checkpoint directory (``CLIPModel`` or
``CLIPVisionModelWithProjection``, e.g. ``openai/clip-vit-large-patch14``) or from the
Stable Diffusion safety checker's checkpoint, whose vision tower is OpenAI's ViT-L/14.
Preprocessing is OpenAI CLIP's (PIL bicubic resize of the short side, centre crop, CLIP
mean/std), computed per frame on the decode threads.

The embedding space a backbone serves is fingerprinted from its projection weights, so a
head trained on one CLIP never silently runs on another.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from modgate.errors import ConfigError

if TYPE_CHECKING:
    from modgate.settings import Settings
    from worker.ingest.decode import Frame

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)

# Projection fingerprints of published checkpoints → the embedding space they serve.
# Filled from real weights (`modgate models list` prints a backbone's fingerprint);
# an unknown fingerprint must be named in settings (detectors.backbone_space).
KNOWN_SPACES: dict[str, str] = {}


def clip_preprocess(image: Image.Image, size: int) -> np.ndarray:
    """RGB frame → (3, size, size) float32, as OpenAI CLIP / open_clip preprocess it."""
    w, h = image.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top = round((new_h - size) / 2.0)
    left = round((new_w - size) / 2.0)
    arr = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    return np.ascontiguousarray(((arr - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1))


def prepare_frame(frame: Frame, size: int) -> np.ndarray:
    return clip_preprocess(frame.image, size)


def fingerprint(projection: torch.Tensor) -> str:
    return hashlib.sha256(projection.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]


def torch_device(settings: Settings) -> torch.device:
    """The torch device the runtime settings ask for; ``auto`` takes CUDA when present."""
    if settings.runtime.device == "cuda" or (settings.runtime.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("device=cuda but torch sees no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


def _autocast_dtype(settings: Settings, device: torch.device) -> torch.dtype | None:
    # Autocast on CUDA and on CPU alike (bf16 pays off on CPUs with AMX/AVX512-BF16);
    # the deviation from fp32 is tested and documented in docs/devices.md.
    if settings.runtime.precision == "fp32":
        return None
    return torch.float16 if settings.runtime.precision == "fp16" else torch.bfloat16


@dataclass
class CheckpointInfo:
    path: Path
    kind: str  # "clip" | "sd_safety_checker" (transformers directories) | "open_clip" (a weights file)


def locate_checkpoint(
    settings: Settings, keys: tuple[str, ...] = ("clip", "sd_safety_checker")
) -> CheckpointInfo:
    """Where the backbone comes from: the ``clip`` weights path, the model directory's
    ``clip/``, else the safety checker's checkpoint (its vision tower is the same CLIP)."""
    looked = []
    candidates: list[Path] = []
    for key in keys:
        if key in settings.detectors.paths:
            candidates.append(settings.detectors.paths[key])
        elif settings.detectors.model_dir is not None:
            candidates.append(settings.detectors.model_dir / key)
    for path in candidates:
        if path.is_file():
            return CheckpointInfo(path, "open_clip")
        config = path / "config.json"
        if config.is_file():
            data = json.loads(config.read_text())
            kind = (
                "sd_safety_checker"
                if "StableDiffusionSafetyChecker" in data.get("architectures", [])
                else "clip"
            )
            return CheckpointInfo(path, kind)
        looked.append(str(config))
    raise ConfigError(
        "clip backbone: no checkpoint found; set --model clip=DIR (a transformers CLIP checkpoint), "
        "--model clip=FILE (open_clip weights, architecture from detectors.backbone_arch) or "
        f"--model sd_safety_checker=DIR; looked in: {'; '.join(looked) or 'no configured path or model dir'}"
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(str(f)))
        return state
    bins = sorted(path.glob("pytorch_model*.bin"))
    if not bins:
        raise ConfigError(f"{path}: no *.safetensors or pytorch_model*.bin weights")
    state = {}
    for f in bins:
        state.update(torch.load(f, map_location="cpu", weights_only=True))
    return state


class _HFImageEncoder(torch.nn.Module):
    """transformers' vision tower + visual projection → projected image embeddings."""

    def __init__(self, vision: torch.nn.Module, projection: torch.nn.Linear) -> None:
        super().__init__()
        self.vision = vision
        self.projection = projection

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.projection(self.vision(pixel_values=pixels).pooler_output)


class ClipBackbone:
    """One CLIP image tower per process; ``embed`` returns projected, unnormalised embeddings."""

    def __init__(
        self,
        encoder: torch.nn.Module,
        projection_weight: torch.Tensor,
        image_size: int,
        source: str,
        settings: Settings,
    ) -> None:
        self.device = torch_device(settings)
        self.autocast = _autocast_dtype(settings, self.device)
        self.encoder = encoder.eval().to(self.device)
        if self.device.type == "cuda":
            self.encoder = self.encoder.to(memory_format=torch.channels_last)
        self.image_size = image_size
        # (out, in) layout, as transformers stores it, whichever library loaded it.
        self.dim = int(projection_weight.shape[0])
        self.fingerprint = fingerprint(projection_weight)
        self.source = source
        self.space = KNOWN_SPACES.get(self.fingerprint) or settings.detectors.backbone_space

    @classmethod
    def load(cls, settings: Settings) -> ClipBackbone:
        info = locate_checkpoint(settings)
        if info.kind == "open_clip":
            return cls._load_open_clip(info, settings)
        return cls._load_transformers(info, settings)

    @classmethod
    def _load_open_clip(cls, info: CheckpointInfo, settings: Settings) -> ClipBackbone:
        import open_clip

        arch = settings.detectors.backbone_arch
        try:
            model = open_clip.create_model(arch, pretrained=str(info.path), device="cpu")
        except Exception as exc:
            raise ConfigError(f"clip backbone: cannot load {info.path} as open_clip {arch}: {exc}") from None
        visual = model.visual
        image_size = visual.image_size[0] if isinstance(visual.image_size, tuple) else visual.image_size
        proj = getattr(visual, "proj", None)
        if proj is None:
            raise ConfigError(f"clip backbone: open_clip {arch} has no visual projection")
        return cls(visual, proj.detach().T, int(image_size), f"open_clip:{arch}:{info.path}", settings)

    @classmethod
    def _load_transformers(cls, info: CheckpointInfo, settings: Settings) -> ClipBackbone:
        from transformers import CLIPConfig, CLIPVisionConfig, CLIPVisionModel

        raw = json.loads((info.path / "config.json").read_text())
        if "vision_config" in raw:
            full = CLIPConfig.from_pretrained(info.path)
            vision_config, projection_dim = full.vision_config, full.projection_dim
        else:
            vision_config = CLIPVisionConfig.from_pretrained(info.path)
            projection_dim = vision_config.projection_dim
        state = read_state_dict(info.path)
        # The tower's own keys (embeddings.*, encoder.*, ...) sit under "vision_model." in
        # CLIPModel and current safety-checker files, under "vision_model.vision_model." in
        # the original CompVis checkpoint; strip whichever prefix this file uses.
        tower: dict[str, torch.Tensor] = {}
        for prefix in ("vision_model.vision_model.", "vision_model."):
            tower = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix + "embeddings.")}
            if tower:
                tower = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
                break
        if not tower or "visual_projection.weight" not in state:
            raise ConfigError(f"{info.path}: not a CLIP checkpoint with a vision tower and visual projection")
        vision = CLIPVisionModel(vision_config)
        # transformers 4 nests the tower one level deeper than transformers 5.
        target = getattr(vision, "vision_model", vision)
        missing, unexpected = target.load_state_dict(tower, strict=False)
        if [m for m in missing if "position_ids" not in m] or unexpected:
            raise ConfigError(
                f"{info.path}: vision tower weights do not fit "
                f"(missing {missing[:3]}, extra {unexpected[:3]})"
            )
        projection = torch.nn.Linear(vision_config.hidden_size, projection_dim, bias=False)
        projection.load_state_dict({"weight": state["visual_projection.weight"]})
        encoder = _HFImageEncoder(vision, projection)
        return cls(encoder, projection.weight, vision_config.image_size, f"{info.kind}:{info.path}", settings)

    def prepare(self, frame: Frame) -> np.ndarray:
        return clip_preprocess(frame.image, self.image_size)

    def preparer(self) -> Callable[[Frame], np.ndarray]:
        """``prepare`` for a decode process (picklable, no weights; see Detector.preparer)."""
        return functools.partial(prepare_frame, size=self.image_size)

    @torch.inference_mode()
    def embed(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(pixels).to(self.device)
        if self.device.type == "cuda":
            x = x.to(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            return self.encoder(x).float()

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "dim": self.dim, "fingerprint": self.fingerprint, "space": self.space}
