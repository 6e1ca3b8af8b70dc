import numpy as np
import pytest
import torch
from PIL import Image

from modgate.errors import ConfigError
from modgate.settings import load_settings
from tests.models import tiny_clip, tiny_safety_checker
from worker.detectors.clip_backbone import ClipBackbone, clip_preprocess
from worker.tools.samples import photo


@pytest.mark.parametrize("size", [(300, 200), (200, 300), (224, 224), (1001, 333), (225, 227)])
def test_preprocessing_equals_openai_clip_transform(size):
    from torchvision import transforms

    # OpenAI CLIP / open_clip image transform (PIL path)
    reference = transforms.Compose(
        [
            transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        ]
    )
    img = photo(*size, seed=sum(size))
    assert np.abs(clip_preprocess(img, 224) - reference(img).numpy()).max() < 1e-5


@pytest.fixture(scope="module")
def checker_dir(tmp_path_factory):
    return tiny_safety_checker(tmp_path_factory.mktemp("sd"))


def test_backbone_from_the_safety_checker_equals_its_own_tower(checker_dir):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    backbone = ClipBackbone.load(load_settings(detectors={"paths": {"sd_safety_checker": str(checker_dir)}}))
    reference = StableDiffusionSafetyChecker.from_pretrained(checker_dir).eval()
    pixels = np.stack([clip_preprocess(photo(320, 240, seed=i), 224) for i in range(4)])
    with torch.no_grad():
        expected = reference.visual_projection(reference.vision_model(torch.from_numpy(pixels))[1])
    got = backbone.embed(pixels)
    assert got.shape == (4, 768)
    assert torch.allclose(got, expected, atol=1e-5)
    assert backbone.source.startswith("sd_safety_checker:")


def test_backbone_from_a_clip_checkpoint_equals_get_image_features(tmp_path):
    from transformers import CLIPModel

    path = tiny_clip(tmp_path / "clip")
    backbone = ClipBackbone.load(load_settings(detectors={"paths": {"clip": str(path)}}))
    reference = CLIPModel.from_pretrained(path).eval()
    pixels = np.stack([clip_preprocess(photo(300, 300, seed=i), 224) for i in range(3)])
    with torch.no_grad():
        out = reference.get_image_features(pixel_values=torch.from_numpy(pixels))
        expected = out if isinstance(out, torch.Tensor) else out.pooler_output
    assert torch.allclose(backbone.embed(pixels), expected, atol=1e-5)


def test_fingerprint_tells_checkpoints_apart(tmp_path, checker_dir):
    a = ClipBackbone.load(load_settings(detectors={"paths": {"sd_safety_checker": str(checker_dir)}}))
    b = ClipBackbone.load(load_settings(detectors={"paths": {"clip": str(tiny_clip(tmp_path / "c"))}}))
    assert a.fingerprint != b.fingerprint and len(a.fingerprint) == 16


def test_missing_checkpoint_names_what_was_looked_for(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.json"):
        ClipBackbone.load(load_settings(detectors={"model_dir": str(tmp_path)}))


def test_frames_go_through_prepare(checker_dir):
    from worker.ingest.decode import Frame

    backbone = ClipBackbone.load(load_settings(detectors={"paths": {"sd_safety_checker": str(checker_dir)}}))
    x = backbone.prepare(Frame(Image.new("RGB", (500, 400), (10, 20, 30)), 1.0))
    assert x.shape == (3, 224, 224) and x.dtype == np.float32


def test_open_clip_weights_file_equals_open_clips_encode_image(tmp_path):
    import json

    import open_clip

    cfg = {
        "embed_dim": 768,
        "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
    }
    (tmp_path / "modgate-tiny-vit.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "modgate-tiny-vit.json")
    torch.manual_seed(4)
    model, _, preprocess = open_clip.create_model_and_transforms("modgate-tiny-vit")
    weights = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), weights)

    settings = load_settings(detectors={"paths": {"clip": str(weights)}, "backbone_arch": "modgate-tiny-vit"})
    backbone = ClipBackbone.load(settings)
    images = [photo(320, 240, seed=i) for i in range(3)]
    with torch.no_grad():
        expected = model.eval().encode_image(torch.stack([preprocess(im) for im in images]))
    got = backbone.embed(np.stack([clip_preprocess(im, 224) for im in images]))
    assert torch.allclose(got, expected, atol=1e-5)
    assert backbone.dim == 768 and backbone.source.startswith("open_clip:modgate-tiny-vit")
