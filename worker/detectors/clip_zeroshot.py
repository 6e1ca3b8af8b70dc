"""``clip_zeroshot``: one score per UnsafeBench category from CLIP text prompts.

Prompts come from the category definitions (UnsafeBench's categories file: "Name:
definition. For example, a, b, c, etc."): the definition itself and "a photo of <example>"
for each example, plus a fixed set of neutral prompts. Each class embedding is the
normalised mean of its prompts' text embeddings, computed once at load. A frame's scores
are softmax(100 · cos(image, classes)) over the 11 categories and ``safe``.

The text tower comes from the ``clip`` checkpoint and must share the backbone's
projection (same fingerprint); token ids come from the checkpoint's tokenizer files or
else from open_clip's bundled copy of the same OpenAI BPE vocabulary.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from modgate.errors import ConfigError
from worker.detectors.base import resolve_weights
from worker.detectors.clip_backbone import fingerprint, read_state_dict
from worker.detectors.clip_family import ClipHead

if TYPE_CHECKING:
    from modgate.settings import Settings
    from worker.detectors.clip_backbone import ClipBackbone

CATEGORY_IDS = {
    "hate": "hate",
    "harassment": "harassment",
    "violence": "violence",
    "self-harm": "self_harm",
    "sexual": "sexual",
    "shocking": "shocking",
    "illegal activity": "illegal_activity",
    "deception": "deception",
    "political": "political",
    "public and personal health": "public_health",
    "spam": "spam",
}
NEUTRAL_PROMPTS = (
    "a photo",
    "an ordinary photo of everyday life",
    "a landscape photo",
    "a portrait photo of a person",
    "a photo of food",
    "a photo of an animal",
    "a photo of a building",
    "a product photo",
    "a screenshot of a document",
    "a photo of people at work",
)
LOGIT_SCALE = 100.0


def category_prompts(text: str) -> dict[str, list[str]]:
    """category id → prompts, from UnsafeBench's definitions file."""
    prompts: dict[str, list[str]] = {}
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        category = CATEGORY_IDS.get(name.strip().lower())
        if not sep or category is None:
            continue
        definition, _, examples = rest.partition("For example,")
        items = [e.strip(" .") for e in re.split(r",", examples) if e.strip(" .") and e.strip(" .") != "etc"]
        prompts[category] = [f"an image showing {definition.strip().rstrip('.')}"] + [
            f"a photo of {e}" for e in items
        ]
    missing = sorted(set(CATEGORY_IDS.values()) - set(prompts))
    if missing:
        raise ValueError(f"categories file lacks: {', '.join(missing)}")
    return prompts


class ZeroShotHead(torch.nn.Module):
    """Embeddings (N, D) → softmax over the class embeddings (N, K)."""

    def __init__(self, class_embeds: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("classes", torch.nn.functional.normalize(class_embeds.float(), dim=-1))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        image = torch.nn.functional.normalize(embeddings.float(), dim=-1)
        return torch.softmax(LOGIT_SCALE * image @ self.classes.T, dim=-1)


def _tokenizer(checkpoint: Path):  # type: ignore[no-untyped-def]
    if (checkpoint / "vocab.json").is_file() and (checkpoint / "merges.txt").is_file():
        from transformers import CLIPTokenizer

        tok = CLIPTokenizer.from_pretrained(checkpoint)
        return lambda texts: tok(
            texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        )["input_ids"]
    import open_clip

    return open_clip.get_tokenizer("ViT-L-14")


def encode_prompts(checkpoint: Path, prompts: dict[str, list[str]]) -> tuple[torch.Tensor, str]:
    """One normalised mean text embedding per class, and the checkpoint's projection fingerprint."""
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(checkpoint).eval()
    tokenize = _tokenizer(checkpoint)
    rows = []
    with torch.inference_mode():
        for texts in prompts.values():
            ids = tokenize(texts)
            out = model.get_text_features(input_ids=ids)
            feats = out if isinstance(out, torch.Tensor) else out.pooler_output
            feats = torch.nn.functional.normalize(feats.float(), dim=-1)
            rows.append(torch.nn.functional.normalize(feats.mean(dim=0), dim=-1))
    return torch.stack(rows), fingerprint(model.visual_projection.weight)


class ClipZeroShot(ClipHead):
    id = "clip_zeroshot"
    FILE = "categories.txt"

    @classmethod
    def load(cls, settings: Settings, backbone: ClipBackbone | None = None) -> ClipZeroShot:
        categories_file = resolve_weights(cls.id, settings, cls.FILE)
        checkpoint = settings.detectors.paths.get("clip") or (
            settings.detectors.model_dir / "clip" if settings.detectors.model_dir else None
        )
        if checkpoint is None or not (checkpoint / "config.json").is_file():
            raise ConfigError(f"{cls.id}: needs a full CLIP checkpoint with a text tower (--model clip=DIR)")
        if "text_projection.weight" not in read_state_dict(checkpoint):
            raise ConfigError(f"{cls.id}: {checkpoint} has no text tower")
        prompts = category_prompts(categories_file.read_text())
        prompts["safe"] = list(NEUTRAL_PROMPTS)
        class_embeds, own = encode_prompts(checkpoint, prompts)
        if backbone is None or backbone.fingerprint != own:
            raise ConfigError(
                f"{cls.id}: the text tower of {checkpoint} belongs to projection {own}; the backbone "
                f"has {backbone.fingerprint if backbone else 'not loaded'}"
            )
        revision = own
        return cls(
            ZeroShotHead(class_embeds), "clip zero-shot (UnsafeBench definitions)", revision, tuple(prompts)
        )
