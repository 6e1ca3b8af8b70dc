"""PDQ hashing: its cost against decoding, the distance a draft-decoded frame introduces,
and how far edits and crops move a hash, on photo-like generated JPEGs of 0.3–12 MP
(worker.tools.samples sizes; photo and skin_scene alternating).

Per image, the least of ``--rounds`` runs, in CPU time of this process (core-ms: robust
to other load on a shared machine):
- decode: ``decode_image`` full size (draft off) and draft (DCT scaling to 2× ``--side``,
  the PIL path's default with Open-NSFW: 256);
- ``pdq_hash`` of the full frame and of the draft frame; ``exact_hashes`` of the bytes;
- the PDQ distance between the draft frame's hash and the full frame's, and between a
  1/2-scale draft decode's (the largest reduced decode libjpeg offers) and the full frame's.
Then, on ``--edits`` 800×600 images: JPEG quality 60, resized 50 %, brightness +15 %, and
crops of 3, 5 and 10 % (off the top-left corner, and centred), each against the original.

    python bench/bench_hashing.py [--count 48] [--rounds 3] [--side 256] [--edits 24]
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

from PIL import Image, ImageEnhance

from modgate.settings import DecodeSettings
from worker.ingest.decode import decode_image
from worker.ingest.hashing import exact_hashes, pdq_distance, pdq_hash
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


def cost_and_draft(count: int, rounds: int, side: int) -> dict[str, Any]:
    plan = [mp for mp, share in JPEG_SIZES_MP for _ in range(share)]
    rows: list[dict[str, Any]] = []
    for i in range(count):
        mp = plan[i % len(plan)]
        w, h = _size(mp, i)
        data = jpeg((photo if i % 2 == 0 else skin_scene)(w, h, 900 + i))
        full, full_ms = core_ms(lambda d=data: decode_image(d, DecodeSettings(draft=False), side), rounds)
        draft, draft_ms = core_ms(lambda d=data: decode_image(d, DecodeSettings(), side), rounds)
        (pdq_full, quality), pdq_full_ms = core_ms(lambda f=full: pdq_hash(f.frames[0].image), rounds)
        (pdq_draft, _), pdq_draft_ms = core_ms(lambda f=draft: pdq_hash(f.frames[0].image), rounds)
        pdq_half, _ = pdq_hash(half_scale(data))
        _, exact_ms = core_ms(lambda d=data: exact_hashes(d), rounds)
        rows.append(
            {
                "mp": mp,
                "size": [w, h],
                "draft_size": list(draft.frames[0].image.size),
                "quality": quality,
                "draft_distance": pdq_distance(pdq_full, pdq_draft),
                "half_scale_distance": pdq_distance(pdq_full, pdq_half),
                "decode_full_ms": full_ms,
                "decode_draft_ms": draft_ms,
                "pdq_full_ms": pdq_full_ms,
                "pdq_draft_ms": pdq_draft_ms,
                "exact_ms": exact_ms,
            }
        )
    by_mp: dict[str, Any] = {}
    for mp in sorted({r["mp"] for r in rows}):
        group = [r for r in rows if r["mp"] == mp]
        by_mp[f"{mp:g} MP"] = {
            "images": len(group),
            "reduced_by_draft": sum(r["draft_size"] != r["size"] for r in group),
            "draft_distance": summary([r["draft_distance"] for r in group]),
            "half_scale_distance": summary([r["half_scale_distance"] for r in group]),
            **{
                key: round(statistics.fmean(r[key] for r in group), 2)
                for key in ("decode_full_ms", "decode_draft_ms", "pdq_full_ms", "pdq_draft_ms", "exact_ms")
            },
        }
    distances = [r["draft_distance"] for r in rows]
    reduced = [r["draft_distance"] for r in rows if r["draft_size"] != r["size"]]
    return {
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
    args = ap.parse_args()
    result = {
        "count": args.count,
        "rounds": args.rounds,
        "cost_and_draft": cost_and_draft(args.count, args.rounds, args.side),
        "edits": edits(args.edits),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
