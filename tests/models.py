"""Tiny, randomly initialised checkpoints built from the real configs and saved with the
real ``save_pretrained``, so tests exercise the real loading code without a hub."""

from __future__ import annotations

import math
from pathlib import Path

import torch


def tiny_clip_config(projection_dim: int = 768):
    from transformers import CLIPConfig

    # The real BPE vocabulary size, so real token ids (open_clip's tokenizer) fit.
    return CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "vocab_size": 49408,
            "max_position_embeddings": 77,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 224,
            "patch_size": 32,
        },
        projection_dim=projection_dim,
        logit_scale_init_value=math.log(100.0),  # CLIP's trained scale: cosines x 100
    )


def tiny_safety_checker(directory: Path, seed: int = 0, clip: Path | None = None) -> Path:
    """diffusers' StableDiffusionSafetyChecker, tiny, with random concept embeddings. With
    ``clip``, its tower and projection are that CLIP checkpoint's, as the real checker's
    are OpenAI's ViT-L/14."""
    import numpy as np
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    from worker.detectors.clip_backbone import clip_preprocess
    from worker.tools.samples import photo, skin_scene

    torch.manual_seed(seed)
    model = StableDiffusionSafetyChecker(tiny_clip_config()).eval()
    if clip is not None:
        from transformers import CLIPModel

        source = CLIPModel.from_pretrained(clip)
        model.vision_model.load_state_dict(source.vision_model.state_dict())
        model.visual_projection.load_state_dict(source.visual_projection.state_dict())
    pixels = np.stack(
        [clip_preprocess(photo(300, 240, seed=i), 224) for i in range(4)]
        + [clip_preprocess(skin_scene(300, 400, seed=i), 224) for i in range(4)]
    )
    with torch.no_grad():
        model.concept_embeds.normal_()
        model.special_care_embeds.normal_()
        # Calibrate thresholds on sample images so that one concept and one special-care
        # concept fire on some images and not on others; the rest stay quiet.
        embeds = torch.nn.functional.normalize(
            model.visual_projection(model.vision_model(torch.from_numpy(pixels))[1])
        )
        for embeds_name, weights_name, live, quantile in (
            ("concept_embeds", "concept_embeds_weights", 3, 0.5),
            ("special_care_embeds", "special_care_embeds_weights", 1, 0.8),
        ):
            cos = embeds @ torch.nn.functional.normalize(getattr(model, embeds_name)).T
            weights = cos.max(dim=0).values + 0.05
            weights[live] = cos[:, live].quantile(quantile)
            getattr(model, weights_name).copy_(weights)
    model.save_pretrained(directory)
    return directory


def tiny_clip(directory: Path, seed: int = 1) -> Path:
    """transformers' CLIPModel, tiny: a backbone checkpoint like openai/clip-vit-large-patch14."""
    from transformers import CLIPModel

    torch.manual_seed(seed)
    CLIPModel(tiny_clip_config()).save_pretrained(directory)
    return directory


def tiny_falconsai(directory: Path, seed: int = 2) -> Path:
    """A tiny ViTForImageClassification with Falconsai's labels and processor settings."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=224,
        patch_size=16,
        id2label={0: "normal", 1: "nsfw"},
        label2id={"normal": 0, "nsfw": 1},
    )
    ViTForImageClassification(config).save_pretrained(directory)
    ViTImageProcessor(
        size={"height": 224, "width": 224}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(directory)
    return directory
