"""open_nsfw and nudenet on their two runtimes, side by side: the packaged ONNX file on
onnxruntime vs the torch module converted from it (onnx2torch), per batch, on the same
preprocessed inputs. It is what ``runtime.onnx=auto`` rests on: onnxruntime on CPU,
torch on CUDA (where onnxruntime would need the onnxruntime-gpu build).

    python bench/bench_onnx_runtimes.py [--batch 8] [--reps 10] [--device cpu] [--threads N]
        [--out bench/results/onnx_runtimes.json]

Model calls only (no decode, no preprocessing inside the clock); median and min of
``--reps`` timed batches, the runtimes alternating, after two warm-up batches each.
``--threads`` gives both runtimes the same intra-op thread count (torch's spinning OpenMP
pool suffers far more than onnxruntime's when other processes share the cores: the JSON
records the load average).
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from modgate.settings import load_settings
from worker.detectors.nudenet import _packaged_model as nudenet_file
from worker.detectors.nudenet import preprocess as nudenet_preprocess
from worker.detectors.onnx_torch import OrtModel, TorchModel
from worker.detectors.open_nsfw import _packaged_model as open_nsfw_file
from worker.detectors.open_nsfw import preprocess as open_nsfw_preprocess
from worker.tools.samples import photo, skin_scene


def inputs(batch: int) -> dict[str, np.ndarray]:
    images = [(skin_scene if i % 2 else photo)(640, 480, seed=i) for i in range(batch)]
    return {
        "open_nsfw": np.stack([open_nsfw_preprocess(img) for img in images]),
        "nudenet": nudenet_preprocess([np.asarray(img) for img in images]),
    }


def time_batches(models: dict, batch: np.ndarray, reps: int) -> dict[str, list[float]]:
    """Seconds per batch for each model; the models alternate rep by rep, so a burst of
    load from other processes hits both runtimes alike."""
    for model in models.values():
        for _ in range(2):
            model.run(batch)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(reps):
        for name, model in models.items():
            start = time.perf_counter()
            model.run(batch)
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads for both runtimes")
    parser.add_argument("--out", type=Path, default=Path("bench/results/onnx_runtimes.json"))
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    runtime = {"device": args.device, "precision": args.precision, "threads": args.threads}
    settings = load_settings(runtime=runtime)
    load_before = os.getloadavg()
    data = inputs(args.batch)
    files = {"open_nsfw": open_nsfw_file(), "nudenet": nudenet_file()}
    rows = []
    for model_id, path in files.items():
        if path is None:
            print(f"{model_id}: package not installed, skipped")
            continue
        batch = data[model_id]
        ort_model = OrtModel(path, settings, args.device)
        torch_model = TorchModel.convert(path, args.device, args.precision)
        deviation = float(np.abs(ort_model.run(batch) - torch_model.run(batch)).max())
        models = {"onnxruntime": ort_model, "torch": torch_model}
        for name, times in time_batches(models, batch, args.reps).items():
            model = models[name]
            median = statistics.median(times)
            rows.append(
                {
                    "model": model_id,
                    "runtime": name,
                    "device": model.device,
                    "batch": args.batch,
                    "median_ms": round(median * 1000, 2),
                    "min_ms": round(min(times) * 1000, 2),
                    "images_per_s": round(args.batch / median, 1),
                }
            )
        rows[-1]["max_abs_diff_vs_onnxruntime"] = deviation
        rows[-1]["torch_over_onnxruntime"] = round(rows[-1]["median_ms"] / rows[-2]["median_ms"], 2)

    print(f"{'model':10} {'runtime':12} {'device':6} {'median ms':>10} {'min ms':>8} {'img/s':>8}")
    for r in rows:
        print(
            f"{r['model']:10} {r['runtime']:12} {r['device']:6} {r['median_ms']:10.1f} "
            f"{r['min_ms']:8.1f} {r['images_per_s']:8.1f}"
        )
    for r in rows:
        if "torch_over_onnxruntime" in r:
            print(
                f"{r['model']}: torch/onnxruntime time ratio {r['torch_over_onnxruntime']}, "
                f"max |diff| {r['max_abs_diff_vs_onnxruntime']:.2e}"
            )
    result = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "loadavg_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        },
        "settings": {**runtime, "batch": args.batch, "reps": args.reps},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
