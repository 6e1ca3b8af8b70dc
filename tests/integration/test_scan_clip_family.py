"""``modgate scan`` with the CLIP family on tiny local checkpoints plus the original head
files: one backbone pass feeds every head, and every head's raw scores reach the verdict."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import SHARED
from tests.models import tiny_safety_checker
from worker.tools.samples import photo, skin_scene

CLIP_DETECTORS = ["sd_safety_checker", "laion_nsfw", "q16", "multiheaded", "laion_violence"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    sd = tiny_safety_checker(tmp_path_factory.mktemp("sd"), seed=5)
    shared = SHARED / "models"
    return {
        "sd_safety_checker": sd,
        "laion_nsfw": shared / "laion-clip-nsfw" / "clip_autokeras_binary_nsfw.zip",
        "q16": shared / "q16" / "prompts_vit_l_14.p",
        "multiheaded": shared / "multiheaded",
        "laion_violence": shared / "laion-clip-nsfw" / "violence_detection_vit_l_14.npy",
    }


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    for i in range(3):
        photo(400, 300, seed=i).save(d / f"p{i}.jpg")
        skin_scene(300, 400, seed=i).save(d / f"s{i}.png")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 nope")
    return d


def scan(target, models, extra_env=None, detectors=CLIP_DETECTORS):
    """Run ``modgate scan`` with ``--model`` for every detector listed (and ``clip`` if given)."""
    args = [sys.executable, "-m", "worker.cli", "scan", str(target), "--no-progress"]
    args += ["--detectors", ",".join(detectors)]
    for weights_id, path in models.items():
        if weights_id in detectors or weights_id == "clip":
            args += ["--model", f"{weights_id}={path}"]
    env = {**os.environ, "MODGATE_DETECTORS__BACKBONE_SPACE": "openai/ViT-L-14", **(extra_env or {})}
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)


def test_every_clip_head_reports_raw_scores(images, models):
    proc = scan(images, models)
    assert proc.returncode == 0, proc.stderr
    verdicts = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(verdicts) == 7
    ok = [v for v in verdicts if v["status"] == "ok"]
    assert len(ok) == 6
    for v in ok:
        det = v["detectors"]
        assert set(det) == set(CLIP_DETECTORS)
        assert len(det["sd_safety_checker"]["scores"]) == 22
        assert 0.0 <= det["laion_nsfw"]["scores"]["nsfw"] <= 1.0
        assert det["q16"]["scores"]["inappropriate"] + det["q16"]["scores"][
            "non_inappropriate"
        ] == pytest.approx(1.0)
        assert set(det["multiheaded"]["scores"]) == {
            "sexual",
            "violent",
            "disturbing",
            "hateful",
            "political",
        }
        assert set(det["laion_violence"]["scores"]) == {"violent", "non_violent"}
        assert v["categories"]["violence"]["covered"] and v["categories"]["political"]["covered"]
        assert not v["categories"]["spam"]["covered"]  # only clip_zeroshot covers spam
    broken = next(v for v in verdicts if v["status"] == "error")
    assert broken["error"]["code"] == "corrupt_image"


def test_heads_refuse_a_backbone_of_unknown_space(images, models):
    proc = scan(
        images,
        models,
        extra_env={"MODGATE_DETECTORS__BACKBONE_SPACE": ""},
        detectors=["sd_safety_checker", "q16"],
    )
    assert proc.returncode == 3
    assert "refusing to run a head trained on openai/ViT-L-14" in proc.stderr


def test_a_head_of_another_width_is_refused(images, models):
    models = {**models, "q16": SHARED / "models" / "q16" / "prompts_vit_b_32.p"}
    proc = scan(images, models, detectors=["sd_safety_checker", "q16"])
    assert proc.returncode == 3 and "512-d" in proc.stderr and "768-d" in proc.stderr


def test_zero_shot_covers_every_category(images, tmp_path):
    from tests.models import tiny_clip

    models = {
        "clip": tiny_clip(tmp_path / "clip"),
        "clip_zeroshot": SHARED / "models" / "unsafebench" / "categories.txt",
        "q16": SHARED / "models" / "q16" / "prompts_vit_l_14.p",
    }
    proc = scan(images / "p0.jpg", models, detectors=["clip_zeroshot", "q16"])
    assert proc.returncode == 0, proc.stderr
    verdict = json.loads(proc.stdout)
    assert all(c["covered"] for c in verdict["categories"].values())
    assert sum(verdict["detectors"]["clip_zeroshot"]["scores"].values()) == pytest.approx(1.0, abs=1e-4)


def test_the_whole_ensemble_in_one_scan(images, tmp_path):
    """The issue's done-when: all seven model detectors in one scan on tiny local
    checkpoints, the safety checker and the zero-shot text tower sharing one backbone."""
    from tests.models import tiny_clip, tiny_falconsai

    clip = tiny_clip(tmp_path / "clip")
    shared = SHARED / "models"
    models = {
        "clip": clip,
        "sd_safety_checker": tiny_safety_checker(tmp_path / "sd", clip=clip),
        "laion_nsfw": shared / "laion-clip-nsfw" / "clip_autokeras_binary_nsfw.zip",
        "q16": shared / "q16" / "prompts_vit_l_14.p",
        "multiheaded": shared / "multiheaded",
        "laion_violence": shared / "laion-clip-nsfw" / "violence_detection_vit_l_14.npy",
        "clip_zeroshot": shared / "unsafebench" / "categories.txt",
        "falconsai_vit": tiny_falconsai(tmp_path / "falconsai"),
    }
    detectors = [d for d in models if d != "clip"]
    proc = scan(images, models, detectors=detectors)
    assert proc.returncode == 0, proc.stderr
    verdicts = [json.loads(line) for line in proc.stdout.splitlines()]
    ok = [v for v in verdicts if v["status"] == "ok"]
    assert len(ok) == 6
    for v in ok:
        assert set(v["detectors"]) == set(detectors)
        assert all(v["detectors"][d]["scores"] for d in detectors)
        assert all(c["covered"] for c in v["categories"].values())
