"""Decode + preprocess cost, PIL path vs tensor path, on a photo-like JPEG mix
(worker.tools.samples sizes, 0.3–12 MP): what it takes to turn a JPEG into detector inputs.

Reported as CPU time of this process per image (core-ms: robust to other load on a shared
machine), with wall-clock images/s beside it (PIL: one thread, image by image; tensor:
``TensorPath.run`` on batches, whose CPU decodes spread over ``decode.workers`` threads).

PIL path: ``decode_image`` (JPEG draft mode when every enabled detector allows it) then
each detector's ``prepare``. Tensor path: ``torchvision.io.decode_jpeg`` on the device
(here the CPU), then the tensor preprocessing. torch and OpenCV use one thread each.

    python bench/bench_tensor_decode.py [--count 24] [--batch 32] [--rounds 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import io
import json
import time
import warnings

import torch

from modgate.settings import DecodeSettings, load_settings
from worker.detectors import LoadedDetectors
from worker.detectors.nudenet import NudeNet
from worker.detectors.open_nsfw import OpenNSFW
from worker.device.preprocess_tensor import TensorPath
from worker.ingest.decode import decode_image
from worker.tools.samples import JPEG_SIZES_MP, _size, photo

warnings.filterwarnings("ignore")


def jpeg_mix(count: int) -> list[bytes]:
    plan = [mp for mp, share in JPEG_SIZES_MP for _ in range(share)]
    out = []
    for i in range(count):
        w, h = _size(plan[i % len(plan)], i)
        buf = io.BytesIO()
        photo(w, h, seed=i).save(buf, format="JPEG", quality=88)
        out.append(buf.getvalue())
    return out


def timed(fn, n: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(core-ms per image, wall images/s) of fn()."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return (time.process_time() - cpu) * 1000 / n, n / (time.perf_counter() - wall)


def pil_path(datas: list[bytes], loaded: LoadedDetectors, settings: DecodeSettings) -> None:
    side = loaded.draft_side(False)
    for data in datas:
        for frame in decode_image(data, settings, side).frames:
            if loaded.backbone is not None:
                loaded.backbone.prepare(frame)
            for det in loaded.detectors:
                det.prepare(frame)


def tensor_path(
    datas: list[bytes], loaded: LoadedDetectors, settings: DecodeSettings, batch: int, device: str
) -> None:
    path = TensorPath(settings, device, loaded.backbone, loaded.detectors)
    for i in range(0, len(datas), batch):
        results = path.run(datas[i : i + batch])
        if device == "cuda":
            torch.cuda.synchronize()
        assert all(type(r).__name__ == "TensorResult" for r in results)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=24)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import cv2

    cv2.setNumThreads(1)
    datas = jpeg_mix(args.count)
    settings = load_settings()
    sets = {
        "open_nsfw (PIL drafts)": LoadedDetectors([OpenNSFW.load(settings)], {}),
        "open_nsfw+nudenet (full decode)": LoadedDetectors(
            [OpenNSFW.load(settings), NudeNet.load(settings)], {}
        ),
    }
    results = {}
    megabytes = sum(map(len, datas)) / 1e6
    print(f"{len(datas)} JPEGs, {megabytes:.1f} MB, device={args.device}, torch threads={args.threads}")
    print(
        f"{'detectors':34} {'PIL core-ms':>11} {'tensor core-ms':>14} {'PIL img/s':>9} {'tensor img/s':>12}"
    )
    for name, loaded in sets.items():
        pil_path(datas[:2], loaded, settings.decode)  # warm-up
        tensor_path(datas[:2], loaded, settings.decode, args.batch, args.device)
        n = len(datas)
        pil = min(
            timed(lambda ld=loaded: pil_path(datas, ld, settings.decode), n) for _ in range(args.rounds)
        )
        ten = min(
            timed(lambda ld=loaded: tensor_path(datas, ld, settings.decode, args.batch, args.device), n)
            for _ in range(args.rounds)
        )
        results[name] = {
            "pil_core_ms": round(pil[0], 2),
            "tensor_core_ms": round(ten[0], 2),
            "pil_images_s_wall": round(pil[1], 2),
            "tensor_images_s_wall": round(ten[1], 2),
        }
        print(f"{name:34} {pil[0]:11.1f} {ten[0]:14.1f} {pil[1]:9.1f} {ten[1]:12.1f}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(
                {"count": len(datas), "device": args.device, "threads": args.threads, **results}, fh, indent=2
            )


if __name__ == "__main__":
    main()
