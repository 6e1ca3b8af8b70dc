"""``modgate bench`` as a user runs it: a real subprocess, its JSON report checked for the
fields the README promises and for figures that agree with each other (no timings are
asserted: speed is what the command reports, not what a test can expect)."""

import json
import math
import os
import subprocess
import sys

import pytest

from worker.tools.bench import format_table, jpeg_bytes

MODGATE = [sys.executable, "-m", "worker.cli"]


def bench(args, cache_dir):
    proc = subprocess.run(
        [*MODGATE, "bench", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "MODGATE_DETECTORS__CACHE_DIR": str(cache_dir)},
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def check_consistent(r):
    e2e, pure, lim, cost = r["end_to_end"], r["pure"], r["limit"], r["per_image_core_ms"]
    assert e2e["images"] > 0 and e2e["batches"] >= 1 and e2e["errors"] == {}
    assert {"fetch", "decode", "prepare", "queue", "infer", "total"} <= set(e2e["stage_ms"])
    assert math.isclose(r["ratio_end_to_end_over_pure"], e2e["images_per_s"] / pure["images_per_s"])
    # Pure images/s is the inverse of the summed per-component milliseconds.
    assert math.isclose(pure["images_per_s"], 1000 / sum(pure["ms_per_image"].values()), rel_tol=1e-9)
    assert set(pure["ms_per_image"]) == set(pure["core_ms_per_image"]) == set(pure["way"])
    assert cost["decode"] > 0 and cost["preprocess"] > 0
    assert math.isclose(cost["inference"], sum(pure["core_ms_per_image"].values()))
    work = cost["decode"] + cost["preprocess"] + cost["inference"]
    assert math.isclose(lim["cpu_images_per_s"], lim["cores"] * 1000 / work)
    assert r["device"] == "cpu" and lim["images_per_s"] == lim["cpu_images_per_s"]
    assert math.isclose(lim["achieved_fraction"], e2e["images_per_s"] / lim["images_per_s"])
    assert math.isclose(lim["cpu_overhead"], e2e["core_ms_per_image"] / work)


def test_bench_open_nsfw_on_the_generated_mix_reports_consistent_json(tmp_path):
    proc = bench(["--seconds", "2", "--detectors", "open_nsfw", "--count", "2", "--json"], tmp_path)
    r = json.loads(proc.stdout)
    assert r["detectors"] == ["open_nsfw"] and r["devices"] == {"open_nsfw": "cpu"}
    assert r["pure"]["way"] == {"open_nsfw": "model"}
    assert r["images"]["count"] == 2 and "generated JPEG mix" in r["images"]["source"]
    assert len(list((tmp_path / "bench-images").glob("*.jpg"))) == 2
    assert "clip_backbone" not in r and "peak_gpu_memory_gib" not in r  # no backbone, no CUDA
    check_consistent(r)


@pytest.fixture
def photos(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    for i, (w, h) in enumerate([(640, 480), (800, 1200), (1024, 768)]):
        (d / f"p{i}.jpg").write_bytes(jpeg_bytes(w, h, seed=i))
    (d / ".hidden.jpg").write_bytes(jpeg_bytes(64, 64, seed=9))
    return d


def test_bench_random_init_clip_family_reports_backbone_flops(photos, tmp_path):
    cache = tmp_path / "cache"
    args = [str(photos), "--random-init", "--random-size", "tiny", "--seconds", "1"]
    args += ["--detectors", "sd_safety_checker,falconsai_vit,nudenet", "--batch", "4"]
    r = json.loads(bench([*args, "--json"], cache).stdout)
    assert r["detectors"] == ["sd_safety_checker", "falconsai_vit", "nudenet"]
    assert r["images"]["count"] == 3 and r["batch"] == 4
    assert set(r["pure"]["way"]) == {"clip_backbone", "sd_safety_checker", "falconsai_vit", "nudenet"}
    assert r["backbone"]["space"] == "openai/ViT-L-14"
    assert (cache / "bench-random" / "tiny" / "sd_safety_checker" / "config.json").is_file()
    assert r["draft_side"] == 0  # nudenet opts out of draft decoding
    bb = r["clip_backbone"]
    assert bb["gflops_per_image"] > 0 and bb["peak_tflops"] is None  # no peak on a CPU
    assert math.isclose(bb["images_per_s"], 1000 / r["pure"]["ms_per_image"]["clip_backbone"])
    assert math.isclose(bb["achieved_tflops"], bb["gflops_per_image"] * bb["images_per_s"] / 1000)
    check_consistent(r)

    table = format_table(r)
    for line in ("end to end (Pipeline)", "pure model (ready tensors)", "ratio end to end / pure", "limit"):
        assert line in table
    assert "achieved fraction of the limit" in table and "GFLOP/image" in table


def test_bench_without_images_exits_with_a_message(tmp_path):
    proc = subprocess.run(
        [*MODGATE, "bench", str(tmp_path), "--detectors", "open_nsfw"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 3 and "no images" in proc.stderr


def test_random_init_configs_are_full_size_vit_l14_and_vit_b16():
    """The hand-written configs are the published shapes: ViT-L/14's vision tower has
    303,179,776 parameters and costs 2 × (12·T·D² + 2·T²·D) per layer (T = 257 tokens,
    D = 1024), ≈ 162 GFLOP an image; ViT-B/16's classifier ≈ 35 GFLOP. Counted on torch's
    meta device: nothing is allocated or computed."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPVisionModel, ViTForImageClassification

    from worker.tools.bench import clip_vit_l14_config, falconsai_config

    with torch.device("meta"):
        clip = CLIPVisionModel(clip_vit_l14_config("full").vision_config)
        vit = ViTForImageClassification(falconsai_config("full"))
    assert sum(p.numel() for p in clip.parameters()) == 303_179_776
    flops = {}
    for name, model in (("clip", clip), ("vit", vit)):
        counter = FlopCounterMode(display=False)
        with counter:
            model(pixel_values=torch.zeros(1, 3, 224, 224, device="meta"))
        flops[name] = counter.get_total_flops()

    def vit_flops(tokens, width, layers):
        return layers * 2 * (12 * tokens * width**2 + 2 * tokens**2 * width)

    assert flops["clip"] == pytest.approx(vit_flops(257, 1024, 24), rel=0.01)
    assert flops["vit"] == pytest.approx(vit_flops(197, 768, 12), rel=0.01)
