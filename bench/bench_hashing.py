"""PDQ hashing: its cost against decoding, the distance a draft-decoded frame introduces,
and how far edits and crops move a hash, on photo-like generated JPEGs of 0.3–12 MP
(worker.tools.samples sizes; photo and skin_scene alternating).

Per image, the least of ``--rounds`` runs, in CPU time of this process (core-ms: robust
to other load on a shared machine):
- decode: ``decode_image`` full size (draft off) and draft (DCT scaling to 2× ``--side``,
  the PIL path's default with Open-NSFW: 256);
- ``pdq_hash`` of the full frame (what the pipeline runs: ``pdqhash`` up to
  ``DIRECT_MAX_PX``, PDQ's filter sampled at its 64×64 points above), ``pdqhash`` itself on
  the full frame (the cost before), and ``pdq_hash`` of the draft frame; ``exact_hashes``;
- the PDQ distance to ThreatExchange's hash of the file (``pdq_from_bytes``: the full
  decode) of: ``pdq_hash``; the draft frame's; a 1/2-scale draft decode's (the largest
  reduced decode libjpeg offers); an integer box pre-reduction (``Image.reduce(k)``, k =
  short side // target) then ``pdqhash``, for each of ``--targets``; and the tensor path's
  device code (``device_buffer64`` on a torch tensor, on the CPU here), with their core-ms.
Then, on ``--edits`` 800×600 images: JPEG quality 60, resized 50 %, brightness +15 %, and
crops of 3, 5 and 10 % (off the top-left corner, and centred), each against the original.

    python bench/bench_hashing.py [--count 48] [--rounds 3] [--side 256] [--edits 24]
        [--targets 1024,768,512,384,256]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pdqhash
import torch
from PIL import Image, ImageEnhance
from threatexchange.signal_type.pdq.pdq_hasher import pdq_from_bytes

from modgate.settings import DecodeSettings
from worker.device.pdq_tensor import device_buffer64
from worker.ingest.decode import decode_image
from worker.ingest.hashing import DIRECT_MAX_PX, exact_hashes, pdq_distance, pdq_from_buffer64, pdq_hash
from worker.tools.samples import JPEG_SIZES_MP, _size, photo, skin_scene

OUT = Path(__file__).resolve().parent / "results" / "hashing.json"


def core_ms(fn: Callable[[], Any], rounds: int) -> tuple[Any, float]:
    best = float("inf")
    result = None
    for _ in range(rounds):
        start = time.process_time()
        result = fn()
        best = min(best, time.process_time() - start)
    return result, best * 1000


def jpeg(img: Image.Image, quality: int = 88) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def summary(values: list[float]) -> dict[str, float]:
    return {
        "min": round(min(values), 2),
        "mean": round(statistics.fmean(values), 2),
        "max": round(max(values), 2),
    }


def half_scale(data: bytes) -> Image.Image:
    """The JPEG decoded with DCT scaling at exactly 1/2: the largest reduced decode."""
    im = Image.open(io.BytesIO(data))
    im.draft("RGB", (im.width // 2, im.height // 2))
    return im.convert("RGB")


def pdqhash_hex(image: Image.Image) -> tuple[str, int]:
    """``pdqhash.compute`` on the whole frame, whatever its size (the cost before sampling)."""
    bits, quality = pdqhash.compute(np.asarray(image))
    return np.packbits(bits.astype(np.uint8)).tobytes().hex(), int(quality)


def box_reduced(image: Image.Image, target: int) -> tuple[str, int]:
    k = min(image.size) // target
    return pdqhash_hex(image.reduce(k) if k > 1 else image)


def cost_and_draft(count: int, rounds: int, side: int, targets: list[int]) -> dict[str, Any]:
    plan = [mp for mp, share in JPEG_SIZES_MP for _ in range(share)]
    rows: list[dict[str, Any]] = []
    for i in range(count):
        mp = plan[i % len(plan)]
        w, h = _size(mp, i)
        data = jpeg((photo if i % 2 == 0 else skin_scene)(w, h, 900 + i))
        te_hex, te_quality = pdq_from_bytes(data)
        full, full_ms = core_ms(lambda d=data: decode_image(d, DecodeSettings(draft=False), side), rounds)
        draft, draft_ms = core_ms(lambda d=data: decode_image(d, DecodeSettings(), side), rounds)
        frame = full.frames[0].image
        (pdq_full, quality), pdq_full_ms = core_ms(lambda f=frame: pdq_hash(f), rounds)
        (pdqhash_full, _), pdqhash_full_ms = core_ms(lambda f=frame: pdqhash_hex(f), rounds)
        (pdq_draft, _), pdq_draft_ms = core_ms(lambda f=draft: pdq_hash(f.frames[0].image), rounds)
        pdq_half, _ = pdq_hash(half_scale(data))
        _, exact_ms = core_ms(lambda d=data: exact_hashes(d), rounds)
        pixels = torch.from_numpy(np.array(frame)).permute(2, 0, 1)
        (pdq_device, device_quality), device_ms = core_ms(
            lambda p=pixels: pdq_from_buffer64(device_buffer64(p)), rounds
        )
        reduced = {}
        for target in targets:
            (hex_, q), ms = core_ms(lambda f=frame, t=target: box_reduced(f, t), rounds)
            reduced[target] = {
                "distance": pdq_distance(te_hex, hex_),
                "quality_diff": abs(q - te_quality),
                "ms": ms,
            }
        rows.append(
            {
                "mp": mp,
                "size": [w, h],
                "draft_size": list(draft.frames[0].image.size),
                "quality": quality,
                "distance": pdq_distance(te_hex, pdq_full),
                "quality_diff": abs(quality - te_quality),
                "pdqhash_distance": pdq_distance(te_hex, pdqhash_full),
                "device_distance": pdq_distance(te_hex, pdq_device),
                "device_quality_diff": abs(device_quality - te_quality),
                "draft_distance": pdq_distance(pdq_full, pdq_draft),
                "half_scale_distance": pdq_distance(pdq_full, pdq_half),
                "decode_full_ms": full_ms,
                "decode_draft_ms": draft_ms,
                "pdq_full_ms": pdq_full_ms,
                "pdqhash_full_ms": pdqhash_full_ms,
                "device_cpu_ms": device_ms,
                "pdq_draft_ms": pdq_draft_ms,
                "exact_ms": exact_ms,
                "reduced": reduced,
            }
        )
    by_mp: dict[str, Any] = {}
    for mp in sorted({r["mp"] for r in rows}):
        group = [r for r in rows if r["mp"] == mp]
        by_mp[f"{mp:g} MP"] = {
            "images": len(group),
            "reduced_by_draft": sum(r["draft_size"] != r["size"] for r in group),
            "distance": summary([r["distance"] for r in group]),
            "device_distance": summary([r["device_distance"] for r in group]),
            "draft_distance": summary([r["draft_distance"] for r in group]),
            "half_scale_distance": summary([r["half_scale_distance"] for r in group]),
            **{
                key: round(statistics.fmean(r[key] for r in group), 2)
                for key in (
                    "decode_full_ms",
                    "decode_draft_ms",
                    "pdq_full_ms",
                    "pdqhash_full_ms",
                    "device_cpu_ms",
                    "pdq_draft_ms",
                    "exact_ms",
                )
            },
            "box_reduced": {
                str(t): {
                    "distance": summary([r["reduced"][t]["distance"] for r in group]),
                    "ms": round(statistics.fmean(r["reduced"][t]["ms"] for r in group), 2),
                }
                for t in targets
            },
        }
    distances = [r["draft_distance"] for r in rows]
    reduced = [r["draft_distance"] for r in rows if r["draft_size"] != r["size"]]
    return {
        "direct_max_px": DIRECT_MAX_PX,
        "to_threatexchange": {
            "pdq_hash": {
                "distance": summary([r["distance"] for r in rows]),
                "quality_diff": summary([r["quality_diff"] for r in rows]),
            },
            "pdqhash_full_frame": summary([r["pdqhash_distance"] for r in rows]),
            "device_buffer_cpu": {
                "distance": summary([r["device_distance"] for r in rows]),
                "quality_diff": summary([r["device_quality_diff"] for r in rows]),
            },
            "box_reduced": {
                str(t): {
                    "distance": summary([r["reduced"][t]["distance"] for r in rows]),
                    "quality_diff": summary([r["reduced"][t]["quality_diff"] for r in rows]),
                }
                for t in targets
            },
        },
        "draft_target_px": round(side * DecodeSettings().draft_factor),
        "draft_distance": {
            **summary(distances),
            "reduced_images": len(reduced),
            "of_reduced": summary(reduced) if reduced else None,
        },
        "half_scale_distance": summary([r["half_scale_distance"] for r in rows]),
        "per_size_core_ms": by_mp,
    }


def crop(img: Image.Image, share: float, centred: bool) -> Image.Image:
    w, h = img.size
    dx, dy = round(w * share), round(h * share)
    x0, y0 = (dx // 2, dy // 2) if centred else (dx, dy)
    return img.crop((x0, y0, x0 + w - dx, y0 + h - dy))


def edits(count: int) -> dict[str, Any]:
    moved: dict[str, list[float]] = {}
    for i in range(count):
        img = (photo if i % 2 == 0 else skin_scene)(800, 600, 400 + i)
        original, _ = pdq_hash(img)
        variants = {
            "jpeg_q60": Image.open(io.BytesIO(jpeg(img, 60))),
            "resized_50": img.resize((400, 300), Image.Resampling.BILINEAR),
            "brightness_115": ImageEnhance.Brightness(img).enhance(1.15),
        }
        for share in (0.03, 0.05, 0.10):
            variants[f"crop_{share:.0%}_corner"] = crop(img, share, centred=False)
            variants[f"crop_{share:.0%}_centred"] = crop(img, share, centred=True)
        for name, variant in variants.items():
            moved.setdefault(name, []).append(pdq_distance(original, pdq_hash(variant)[0]))
    return {"images": count, "size": [800, 600], "distance": {k: summary(v) for k, v in moved.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--side", type=int, default=256)
    ap.add_argument("--edits", type=int, default=24)
    ap.add_argument("--targets", default="1024,768,512,384,256")
    args = ap.parse_args()
    targets = [int(t) for t in args.targets.split(",")]
    result = {
        "count": args.count,
        "rounds": args.rounds,
        "cost_and_draft": cost_and_draft(args.count, args.rounds, args.side, targets),
        "edits": edits(args.edits),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
