"""``modgate bench``: what modgate achieves on the machine it runs on, measured side by
side in one run on one image set.

- end to end: images/s through the real ``Pipeline`` (fetch, decode, preprocess, batch,
  infer, aggregate), as ``modgate scan`` runs it, with the mean per-stage milliseconds
  the verdicts carry;
- pure: images/s of the same detectors' model calls on ready batches (already decoded,
  preprocessed and on the device), and the ratio end to end ÷ pure;
- the limit set by work that cannot be avoided: per image, decode + preprocess core-ms
  (one thread, measured as process CPU time) plus inference core-ms (pure) spread over the
  cores, or on CUDA the lower of that CPU-side limit and the pure GPU rate; the achieved
  fraction of it, and how much CPU end to end spends per image beyond that work;
- on CUDA: peak GPU memory, and the CLIP backbone's achieved TFLOP/s against the card's
  peak where it is known.

``--random-init`` builds full-size models from their configs with random weights
(the ViT-L/14 safety checker that also serves as the CLIP backbone, Falconsai's ViT-B/16),
offline, so a GPU machine without hub access measures real compute; open_nsfw and nudenet
use their packaged weights. ``bench/`` scripts reuse these functions.
"""

from __future__ import annotations

import gc
import io
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from modgate.settings import Settings
    from worker.detectors import LoadedDetectors
    from worker.ingest.decode import Frame

RandomSize = Literal["full", "b32", "tiny"]

# Photo-like JPEGs of 0.3–12 MP, interleaved so that a short mix still spans the sizes.
MIX_MP = (0.3, 2.0, 12.0, 1.0, 5.0, 0.3, 8.0, 1.0, 2.0, 0.3, 5.0, 1.0)
_ASPECTS = (4 / 3, 3 / 2, 16 / 9, 3 / 4, 1.0)

# Dense (no sparsity) tensor-core peaks in TFLOP/s, from the vendors' data sheets; fp32 is
# the plain (non-TF32) figure, since torch does not use TF32 for matmuls unless told to.
# Longer names first: "H100 PCIe" must not match "H100".
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.2}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}),
    ("H200", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}),
    ("GH200", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.1, "fp16": 362.1, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3}),
    ("A10", {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2}),
)


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The card's dense peak for ``precision``, or None for a card not in the table."""
    for name, peaks in PEAK_TFLOPS:
        if name in device_name:
            return peaks.get(precision)
    return None


# -- images ---------------------------------------------------------------------------


def jpeg_mix(out: Path, count: int, megapixels: Sequence[float] = MIX_MP) -> list[Path]:
    """``count`` photo-like JPEGs (quality 88) cycling through ``megapixels``; generated
    once, deterministically, then reused from ``out``."""
    from worker.tools.samples import photo

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        mp = megapixels[i % len(megapixels)]
        aspect = _ASPECTS[i % len(_ASPECTS)]
        height = int((mp * 1e6 / aspect) ** 0.5)
        width = int(height * aspect)
        path = out / f"{i:03d}_{width}x{height}.jpg"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            photo(width, height, seed=i).save(tmp, "JPEG", quality=88)
            tmp.rename(path)  # a run stopped mid-write leaves no truncated "image"
        paths.append(path)
    return paths


def image_files(directory: Path) -> list[Path]:
    """Image files under ``directory`` (recursive, hidden files skipped), sorted."""
    suffixes = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".avif"}
    return sorted(
        p
        for p in directory.rglob("*")
        if p.is_file() and p.suffix.lower() in suffixes and not any(x.startswith(".") for x in p.parts)
    )


# -- random-init checkpoints --------------------------------------------------------------


def clip_vit_l14_config(size: RandomSize = "full") -> Any:
    """openai/clip-vit-large-patch14's CLIPConfig, written out (no hub). ``b32`` and ``tiny``
    keep its interface (224 px, 768-d projection) with a ViT-B/32-sized tower (CPU
    benchmarks) or a two-layer, 32-wide one (tests)."""
    from transformers import CLIPConfig

    if size == "full":
        vision = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24}
        vision |= {"num_attention_heads": 16, "patch_size": 14}
        text = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12}
        text |= {"num_attention_heads": 12}
    elif size == "b32":  # a ViT-B/32-sized tower: real compute that a CPU runs in seconds
        vision = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12}
        vision |= {"num_attention_heads": 12, "patch_size": 32}
        text = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1}
        text |= {"num_attention_heads": 2}
    else:
        vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
        vision |= {"num_attention_heads": 4, "patch_size": 32}
        text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
        text |= {"num_attention_heads": 4}
    common = {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
    return CLIPConfig(
        text_config={**text, **common, "vocab_size": 49408, "max_position_embeddings": 77},
        vision_config={**vision, **common, "image_size": 224, "num_channels": 3},
        projection_dim=768,
        logit_scale_init_value=2.6592,
    )


def falconsai_config(size: RandomSize = "full") -> Any:
    """Falconsai/nsfw_image_detection's ViTConfig (ViT-B/16, 224 px, normal/nsfw)."""
    from transformers import ViTConfig

    shape = (
        {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
        if size != "tiny"
        else {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
    )
    return ViTConfig(
        **shape,
        image_size=224,
        patch_size=16,
        id2label={0: "normal", 1: "nsfw"},
        label2id={"normal": 0, "nsfw": 1},
    )


def random_checkpoints(
    directory: Path, size: RandomSize = "full", which: Sequence[str] = ("sd_safety_checker", "falconsai_vit")
) -> dict[str, Path]:
    """Randomly initialised checkpoints, saved once with the real ``save_pretrained`` under
    ``directory/size`` and loaded by the real loaders: the Stable Diffusion safety checker
    (its vision tower is the ViT-L/14 backbone) and Falconsai's ViT-B/16."""
    import torch

    root = directory / size
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    if "sd_safety_checker" in which:
        checker = root / "sd_safety_checker"
        if not (checker / "config.json").is_file():
            from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

            torch.manual_seed(seed_of("sd_safety_checker"))
            tmp = checker.with_suffix(".tmp")
            StableDiffusionSafetyChecker(clip_vit_l14_config(size)).save_pretrained(tmp)
            tmp.rename(checker)  # complete or absent: a stopped run leaves no half checkpoint
        out |= {"sd_safety_checker": checker, "clip": checker}
    if "falconsai_vit" in which:
        falconsai = root / "falconsai_vit"
        if not (falconsai / "config.json").is_file():
            from transformers import ViTForImageClassification, ViTImageProcessor

            torch.manual_seed(seed_of("falconsai_vit"))
            tmp = falconsai.with_suffix(".tmp")
            ViTForImageClassification(falconsai_config(size)).save_pretrained(tmp)
            ViTImageProcessor(
                size={"height": 224, "width": 224}, image_mean=[0.5] * 3, image_std=[0.5] * 3
            ).save_pretrained(tmp)
            tmp.rename(falconsai)
        out["falconsai_vit"] = falconsai
    return out


def seed_of(name: str) -> int:
    return sum(name.encode())


# Detectors that run on the CLIP backbone, which the random safety checker provides.
_CLIP_CONSUMERS = frozenset({"sd_safety_checker", "laion_nsfw", "q16", "multiheaded", "laion_violence"})


def random_init_overrides(directory: Path, size: RandomSize, detectors: Sequence[str]) -> dict[str, Any]:
    """Settings overrides that put random checkpoints in place of the hub weights the
    ``detectors`` need. CLIP heads still load their own (small) files from the usual places;
    clip_zeroshot needs a text tower, which no random checkpoint here has."""
    which = ["sd_safety_checker"] if _CLIP_CONSUMERS & set(detectors) else []
    which += ["falconsai_vit"] if "falconsai_vit" in detectors else []
    paths = {k: str(v) for k, v in random_checkpoints(directory, size, which).items()}
    return {"detectors": {"paths": paths, "backbone_space": "openai/ViT-L-14"}}


def settings_for(
    load: Callable[[dict[str, Any]], Settings],
    overrides: dict[str, Any],
    random_init: RandomSize | None = None,
) -> Settings:
    """The bench's settings: ``load(overrides)``, then, with ``random_init``, again with
    random checkpoints for whatever weights were not given explicitly."""
    settings = load(overrides)
    if random_init is None:
        return settings
    extra = random_init_overrides(
        settings.detectors.cache_dir / "bench-random", random_init, settings.detectors.ids()
    )
    det = dict(overrides.get("detectors", {}))
    det["paths"] = {**extra["detectors"]["paths"], **det.get("paths", {})}
    det.setdefault("backbone_space", extra["detectors"]["backbone_space"])
    return load({**overrides, "detectors": det})


# -- measurements -----------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


@dataclass
class Prepared:
    """Per-image single-thread costs (process CPU ms) and the prepared inputs of a sample."""

    decode_ms: list[float] = field(default_factory=list)
    prepare_ms: list[float] = field(default_factory=list)
    frames: list[Frame] = field(default_factory=list)
    inputs: list[dict[str, Any]] = field(default_factory=list)


def prepare_inputs(frame: Frame, loaded: LoadedDetectors) -> dict[str, Any]:
    """What the decode stage hands the batcher for one frame: the backbone's input and every
    image detector's ``prepare``."""
    inputs: dict[str, Any] = {}
    if loaded.backbone is not None:
        inputs["clip_backbone"] = loaded.backbone.prepare(frame)
    for d in loaded.detectors:
        if d.input == "image":
            inputs[d.id] = d.prepare(frame)
    return inputs


def decode_and_prepare(paths: Sequence[Path], settings: Settings, loaded: LoadedDetectors) -> Prepared:
    """Decode and preprocess every image once, on this thread, timing each with the process
    CPU clock (immune to other processes on the machine; libjpeg and PIL use one core)."""
    from modgate.errors import ConfigError, ModerationError
    from worker.ingest.decode import decode_image

    draft_side = loaded.draft_side(settings.decode.draft_always, full_frames=settings.hashing.full_frames)
    out = Prepared()
    failed: list[str] = []
    for path in paths:
        data = path.read_bytes()
        t = time.process_time()
        try:
            decoded = decode_image(data, settings.decode, draft_side)
        except ModerationError as exc:  # end to end turns it into an error verdict
            failed.append(f"{path.name}: {exc.code}")
            continue
        out.decode_ms.append((time.process_time() - t) * 1000)
        t = time.process_time()
        inputs = [prepare_inputs(f, loaded) for f in decoded.frames]
        out.prepare_ms.append((time.process_time() - t) * 1000)
        out.frames.extend(decoded.frames)
        out.inputs.extend(inputs)
    if not out.inputs:
        raise ConfigError(f"none of the {len(paths)} images could be decoded ({'; '.join(failed[:3])})")
    return out


@dataclass
class Component:
    """One model call of the pure measurement: the batches it runs on and how it is called
    (``model``: the model alone on device tensors; ``infer``: the detector's ``infer``)."""

    name: str
    way: str
    batches: list[Any]
    call: Callable[[Any], Any]


def _stack(items: list[Any]) -> Any:
    import numpy as np

    return np.stack(items)


def _concat_blobs(items: list[Any]) -> Any:
    import numpy as np

    return np.concatenate([blob for blob, *_ in items])


# How the model-only ``run`` of the ONNX detectors takes a batch of ``prepare`` outputs.
_COLLATE: dict[str, Callable[[list[Any]], Any]] = {"open_nsfw": _stack, "nudenet": _concat_blobs}


def _to_device(x: Any, device: str) -> Any:
    import numpy as np
    import torch

    if device == "cpu":
        return x  # onnxruntime and torch take host arrays as they are
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    return x.to(device) if isinstance(x, torch.Tensor) else x


def components(
    loaded: LoadedDetectors, inputs: list[dict[str, Any]], batch: int, device: str
) -> list[Component]:
    """The pure workload, as ready batches: the backbone on stacked pixels, open_nsfw and
    nudenet through their model-only ``run`` on collated tensors, other image detectors'
    ``infer`` on their (device) inputs, CLIP heads' ``infer`` on embedding rows."""
    import numpy as np
    import torch

    n = max(batch, math.ceil(len(inputs) / batch) * batch)
    sample = [inputs[i % len(inputs)] for i in range(n)]
    groups = [sample[i : i + batch] for i in range(0, n, batch)]
    out: list[Component] = []
    rows: list[Any] = []
    backbone = loaded.backbone
    if backbone is not None:
        pixels = [_to_device(np.stack([x["clip_backbone"] for x in g]), device) for g in groups]
        out.append(Component("clip_backbone", "model", pixels, backbone.embed))
        rows = [list(backbone.embed(b)) for b in pixels]
    for d in loaded.detectors:
        run = getattr(d, "run", None)
        collate = _COLLATE.get(d.id) if run is not None else None
        ready = None
        if collate is not None:
            try:
                ready = [_to_device(collate([x[d.id] for x in g]), device) for g in groups]
            except (TypeError, ValueError, IndexError):
                ready = None  # its prepare output changed shape: time its infer instead
        if d.input == "clip_embedding":
            out.append(Component(d.id, "infer", rows, d.infer))
        elif ready is not None and run is not None:
            out.append(Component(d.id, "model", ready, run))
        else:
            moved = [
                [_to_device(x[d.id], device) if isinstance(x[d.id], torch.Tensor) else x[d.id] for x in g]
                for g in groups
            ]
            out.append(Component(d.id, "infer", moved, d.infer))
    return out


def one_pass(comps: list[Component], device: str) -> dict[str, tuple[float, float]]:
    """Every component once over its batches: name → (wall seconds, process CPU seconds)."""
    out = {}
    for c in comps:
        t, p = time.perf_counter(), time.process_time()
        for b in c.batches:
            c.call(b)
        _sync(device)
        out[c.name] = (time.perf_counter() - t, time.process_time() - p)
    return out


def pure_inference(comps: list[Component], batch: int, seconds: float, device: str) -> dict[str, Any]:
    """Each component over its batches, round after round, until ``seconds`` have passed
    (at least two rounds; the first is a warm-up and not counted). Per component: wall and
    process-CPU ms per image."""
    per_round = sum(len(c.batches) for c in comps[:1]) * batch
    wall = dict.fromkeys((c.name for c in comps), 0.0)
    cpu = dict.fromkeys((c.name for c in comps), 0.0)
    rounds = -1
    deadline = time.perf_counter() + seconds
    while rounds < 1 or time.perf_counter() < deadline:
        for name, (w, p) in one_pass(comps, device).items():
            if rounds >= 0:
                wall[name] += w
                cpu[name] += p
        rounds += 1
    images = per_round * rounds
    total = sum(wall.values())
    return {
        "images": images,
        "images_per_s": images / total,
        "ms_per_image": {k: 1000 * v / images for k, v in wall.items()},
        "core_ms_per_image": {k: 1000 * v / images for k, v in cpu.items()},
        "way": {c.name: c.way for c in comps},
    }


def cpu_and_waits() -> tuple[float, dict[str, float]]:
    """This process's CPU seconds (every thread, ended ones too) and, per live thread, the
    seconds it spent runnable but waiting for a core (Linux schedstat; empty elsewhere):
    how much other processes on the machine took from this one."""
    waits: dict[str, float] = {}
    try:
        for task in Path("/proc/self/task").iterdir():
            try:
                waits[task.name] = int((task / "schedstat").read_text().split()[1]) / 1e9
            except (OSError, ValueError, IndexError):
                continue  # the thread ended meanwhile
    except OSError:
        pass
    return time.process_time(), waits


def end_to_end(
    settings: Settings, loaded: LoadedDetectors, paths: Sequence[Path], seconds: float
) -> dict[str, Any]:
    """The real Pipeline over ``paths`` (cycled), kept full, measured in steady state: the
    images of the batches that start between the first batch start after a warm-up and the
    last one within ``seconds``, over that interval (batches complete in bursts, so counting
    verdicts in a window would be off by up to a batch)."""
    import threading

    from modgate.verdict import Source
    from worker.pipeline import Pipeline

    stop = threading.Event()

    def sources() -> Iterator[Source]:
        i = 0
        while not stop.is_set():
            p = paths[i % len(paths)]
            yield Source(kind="file", uri=str(p), path=str(p))
            i += 1

    batches: list[tuple[float, int]] = []
    warm = max(1.0, min(5.0, seconds / 4))
    done: list[Any] = []
    start = time.perf_counter()
    ta = tb = 0.0
    sched_a = sched_b = cpu_and_waits()
    gc.collect()  # an earlier run's sessions must not end their threads inside the window
    inflight = 2 * settings.batch.max_batch + 2 * settings.decode.workers
    with Pipeline(settings, loaded, on_batch=lambda n: batches.append((time.perf_counter(), n))) as pipe:
        # Two batches in flight (one running, the next decoding); more only lengthens the drain.
        for v in pipe.moderate(sources(), max_inflight=inflight):
            now = time.perf_counter()
            if stop.is_set():
                continue  # draining
            if not ta:
                if now - start >= warm:
                    ta, sched_a = now, cpu_and_waits()
                continue
            done.append(v)
            # Two batch starts bound the window; images that all fail before the batcher
            # never start one, so the run also ends after twice its time.
            started = sum(1 for t, _ in batches if t >= ta)
            if now - ta >= seconds and (started >= 2 or now - ta >= 2 * seconds + 10):
                tb, sched_b = now, cpu_and_waits()
                stop.set()
    window = [(t, n) for t, n in batches if ta <= t <= tb]
    elapsed = window[-1][0] - window[0][0] if len(window) >= 2 else 0.0
    n = sum(k for _, k in window[:-1])
    rate = n / elapsed if elapsed > 0 else 0.0
    wall = tb - ta
    cpu_s = sched_b[0] - sched_a[0]
    wait_s = sum(w - sched_a[1].get(tid, 0.0) for tid, w in sched_b[1].items())
    errors: dict[str, int] = {}
    stages: dict[str, list[float]] = {}
    for v in done:
        if v.status != "ok":
            code = v.error.code if v.error is not None else "unknown"
            errors[str(code)] = errors.get(str(code), 0) + 1
        for k, ms in v.timings_ms.items():
            stages.setdefault(k.removesuffix("_ms"), []).append(ms)
    return {
        "images": n,
        "batches": len(window) - 1,
        "seconds": elapsed,
        "images_per_s": rate,
        "core_ms_per_image": 1000 * cpu_s / (rate * wall) if rate and wall else 0.0,
        "cores_busy": cpu_s / wall if wall else 0.0,
        # Cores this process was ready to use but did not get (other processes).
        "cores_waited_for": wait_s / wall if wall else 0.0,
        "stage_ms": {k: sum(v) / len(v) for k, v in sorted(stages.items())},
        "verdicts": len(done),
        "errors": errors,
    }


def backbone_flops(loaded: LoadedDetectors) -> float | None:
    """FLOPs of one image through the CLIP backbone (torch's FLOP counter: 2 per
    multiply-add), or None without a backbone."""
    backbone = loaded.backbone
    if backbone is None:
        return None
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, backbone.image_size, backbone.image_size)
    counter = FlopCounterMode(display=False)
    # The math attention kernel: the counter does not see every fused CPU kernel's FLOPs.
    with counter, sdpa_kernel([SDPBackend.MATH]):
        backbone.embed(x)
    return float(counter.get_total_flops())


def cpu_count() -> int:
    """Cores this process may run on (affinity and cgroup CPU quota)."""
    from worker.runtime import cpu_cores

    return cpu_cores()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def run_bench(
    settings: Settings,
    paths: Sequence[Path],
    seconds: float,
    images_source: str,
    loaded: LoadedDetectors | None = None,
) -> dict[str, Any]:
    """Every measurement of ``modgate bench``, as one JSON-ready dict."""
    import torch

    from worker.detectors import load_detectors, resolve_device
    from worker.runtime import configure_threads

    configure_threads(settings.runtime)  # as the Pipeline does, before measuring anything
    device = resolve_device(settings.runtime.device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    loaded = loaded or load_detectors(settings)
    batch = settings.batch.max_batch
    prepared = decode_and_prepare(paths, settings, loaded)
    comps = components(loaded, prepared.inputs, batch, device)
    pure = pure_inference(comps, batch, seconds, device)
    e2e = end_to_end(settings, loaded, paths, seconds)

    decode_ms, prepare_ms = _mean(prepared.decode_ms), _mean(prepared.prepare_ms)
    frames_per_image = len(prepared.frames) / max(1, len(prepared.decode_ms))
    cores = cpu_count()
    cpu_work = decode_ms + prepare_ms
    if device == "cpu":
        cpu_work += sum(pure["core_ms_per_image"].values()) * frames_per_image
    cpu_limit = cores * 1000.0 / cpu_work if cpu_work > 0 else math.inf
    limit = cpu_limit if device == "cpu" else min(cpu_limit, pure["images_per_s"] / frames_per_image)
    result: dict[str, Any] = {
        "benchmark": "modgate bench",
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else cpu_name(),
        "precision": settings.runtime.precision,
        "detectors": [d.id for d in loaded.detectors],
        "skipped": loaded.skipped,
        "devices": loaded.devices(),
        "backbone": loaded.backbone.describe() if loaded.backbone is not None else None,
        "batch": batch,
        "max_wait_ms": settings.batch.max_wait_ms,
        "decode_workers": settings.decode.workers,
        # How onnxruntime spreads a batch over the cores on CPU (worker/detectors/onnx_torch.py).
        "onnx_cpu_parallel": settings.runtime.onnx_cpu_parallel if device == "cpu" else None,
        "draft_side": loaded.draft_side(
            settings.decode.draft_always, full_frames=settings.hashing.full_frames
        ),
        "images": {
            "source": images_source,
            "count": len(paths),
            "megapixels_mean": _mean(
                [f.image.size[0] * f.image.size[1] / f.scale**2 / 1e6 for f in prepared.frames]
            ),
            "bytes_mean": _mean([p.stat().st_size for p in paths]),
        },
        "end_to_end": e2e,
        "pure": pure,
        "ratio_end_to_end_over_pure": e2e["images_per_s"] / pure["images_per_s"]
        if pure["images_per_s"]
        else 0.0,
        "per_image_core_ms": {
            "decode": decode_ms,
            "preprocess": prepare_ms,
            "inference": sum(pure["core_ms_per_image"].values()) * frames_per_image
            if device == "cpu"
            else None,
        },
        "limit": {
            "cores": cores,
            "cpu_images_per_s": cpu_limit,
            "images_per_s": limit,
            "bound_by": "cpu" if limit == cpu_limit else "device",
            "achieved_fraction": e2e["images_per_s"] / limit if limit else 0.0,
            # End to end CPU per image over the unavoidable work: > 1 is overhead (threads
            # contending, copies, Python per image), whatever else runs on the machine.
            "cpu_overhead": e2e["core_ms_per_image"] / cpu_work if device == "cpu" and cpu_work else None,
        },
    }
    lim = result["limit"]
    if lim["cpu_overhead"]:
        # On a shared machine other processes take cores this one was ready to use. The
        # fraction it would reach alone: the cores it asked for (used + waited for, at most
        # all of them) at its measured CPU cost per image, over the limit.
        demand = min(cores, e2e["cores_busy"] + e2e["cores_waited_for"])
        lim["fraction_if_unshared"] = demand / cores / lim["cpu_overhead"]
    result |= {
        "machine": {
            "load_average": os.getloadavg(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
    }
    flops = backbone_flops(loaded)
    if flops is not None:
        backbone_ips = 1000.0 / pure["ms_per_image"]["clip_backbone"]
        achieved = flops * backbone_ips / 1e12
        peak = peak_tflops(result["device_name"], settings.runtime.precision) if device == "cuda" else None
        result["clip_backbone"] = {
            "gflops_per_image": flops / 1e9,
            "images_per_s": backbone_ips,
            "achieved_tflops": achieved,
            "peak_tflops": peak,
            "fraction_of_peak": achieved / peak if peak else None,
        }
    if device == "cuda":
        result["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


# -- report -----------------------------------------------------------------------------


def _fmt(x: Any, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return "inf" if math.isinf(x) else f"{x:,.{digits}f}"
    return str(x)


def format_table(r: dict[str, Any]) -> str:
    """The human-readable report of ``run_bench``'s result."""
    e2e, pure, lim = r["end_to_end"], r["pure"], r["limit"]
    img = r["images"]
    decode = f"draft to {r['draft_side']} px" if r["draft_side"] else "full size"
    lines = [
        f"modgate bench on {r['device']} ({r['device_name']}), {r['precision']}, batch {r['batch']}, "
        f"{r['decode_workers']} decode threads"
        + (f", onnxruntime parallel over {r['onnx_cpu_parallel']}" if r.get("onnx_cpu_parallel") else ""),
        f"detectors: {', '.join(r['detectors'])}"
        + (f"  (skipped: {', '.join(r['skipped'])})" if r["skipped"] else ""),
        f"images: {img['count']} from {img['source']}, mean {img['megapixels_mean']:.1f} MP, "
        f"{img['bytes_mean'] / 1e3:.0f} kB; decode {decode}",
        "",
        f"{'end to end (Pipeline)':<34}{_fmt(e2e['images_per_s'], 2):>12} images/s  ({e2e['images']} images)",
        f"{'pure model (ready tensors)':<34}{_fmt(pure['images_per_s'], 2):>12} images/s",
        f"{'ratio end to end / pure':<34}{_fmt(r['ratio_end_to_end_over_pure'], 3):>12}",
        "",
        "per stage, mean ms per image (end to end; inference is per batch):",
    ]
    lines += [f"  {k:<32}{_fmt(v, 2):>12}" for k, v in e2e["stage_ms"].items()]
    lines.append("pure model, ms per image (wall / core):")
    lines += [
        f"  {k:<32}{_fmt(v, 2):>12} / {_fmt(pure['core_ms_per_image'][k], 2)}  ({pure['way'][k]})"
        for k, v in pure["ms_per_image"].items()
    ]
    cost = r["per_image_core_ms"]
    lines += [
        "",
        "limit from unavoidable work, core-ms per image: "
        f"decode {_fmt(cost['decode'])} + preprocess {_fmt(cost['preprocess'])}"
        + (f" + inference {_fmt(cost['inference'])}" if cost["inference"] is not None else "")
        + f", over {lim['cores']} cores",
        f"{'limit':<34}{_fmt(lim['images_per_s'], 2):>12} images/s  (bound by {lim['bound_by']})",
        f"{'achieved fraction of the limit':<34}{_fmt(100 * lim['achieved_fraction'], 1):>11}%",
        f"{'end to end CPU per image':<34}{_fmt(e2e['core_ms_per_image'], 1):>12} core-ms"
        + (f"  ({lim['cpu_overhead']:.2f}× the unavoidable work)" if lim["cpu_overhead"] else "")
        + f", {e2e['cores_busy']:.2f} cores busy, {e2e['cores_waited_for']:.2f} waited for",
    ]
    if lim.get("fraction_if_unshared") is not None and e2e["cores_waited_for"] > 0.1:
        lines.append(
            f"{'(other processes took cores:':<34}{100 * lim['fraction_if_unshared']:>11.1f}% "
            "of the limit estimated for this process alone)"
        )
    bb = r.get("clip_backbone")
    if bb:
        peak = (
            f" of {bb['peak_tflops']:.0f} peak ({100 * bb['fraction_of_peak']:.1f}%)"
            if bb["peak_tflops"]
            else ""
        )
        lines.append(
            f"{'CLIP backbone':<34}{bb['gflops_per_image']:>12.1f} GFLOP/image, "
            f"{bb['achieved_tflops']:.2f} TFLOP/s achieved{peak}"
        )
    if "peak_gpu_memory_gib" in r:
        lines.append(f"{'peak GPU memory':<34}{r['peak_gpu_memory_gib']:>12.2f} GiB")
    if e2e["errors"]:
        lines.append(f"error verdicts: {json.dumps(e2e['errors'])}")
    return "\n".join(lines)


def jpeg_bytes(width: int, height: int, seed: int, quality: int = 85) -> bytes:
    """One photo-like JPEG in memory (queue benchmarks upload these)."""
    from worker.tools.samples import photo

    buf = io.BytesIO()
    photo(width, height, seed).save(buf, "JPEG", quality=quality)
    return buf.getvalue()
