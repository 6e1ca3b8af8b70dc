"""Synthetic images, generated offline and deterministically, for ``make demo``, the
benchmark and the tests: photo-like JPEGs of 0.3–12 MP plus PNG and WebP, skin-toned
scenes that make the nudity detectors fire, and hostile files (truncated, zero-byte, not
an image, decompression bomb, animated).

    python -m worker.tools.samples bench --out .cache/bench-images --count 48
    python -m worker.tools.samples demo --out .demo/images
"""

from __future__ import annotations

import argparse
import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# (megapixels, share of the mix): mostly phone-sized photos, some large, some thumbnails.
JPEG_SIZES_MP = [(0.3, 3), (1.0, 3), (2.0, 2), (5.0, 2), (8.0, 1), (12.0, 1)]


def photo(width: int, height: int, seed: int) -> Image.Image:
    """Smooth gradients, blurred shapes and mild noise: compresses like a photo, unlike noise."""
    rng = np.random.default_rng(seed)
    # Render small then upscale: cheap even for 12 MP, and gives photo-like smooth regions.
    sw, sh = max(8, width // 8), max(8, height // 8)
    y, x = np.mgrid[0:sh, 0:sw].astype(np.float32)
    base = np.stack(
        [
            127 + 100 * np.sin(x / (sw / rng.uniform(1, 4)) + rng.uniform(0, 6)),
            127 + 100 * np.cos(y / (sh / rng.uniform(1, 4)) + rng.uniform(0, 6)),
            127 + 100 * np.sin((x + y) / ((sw + sh) / rng.uniform(2, 6))),
        ],
        axis=-1,
    )
    small = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(small)
    for _ in range(12):
        x0, y0 = rng.integers(0, sw), rng.integers(0, sh)
        r = int(rng.integers(2, max(3, min(sw, sh) // 3)))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=color)
    small = small.filter(ImageFilter.GaussianBlur(1.5))
    img = small.resize((width, height), Image.Resampling.BILINEAR)
    noise = rng.normal(0, 6, (height, width, 1)).astype(np.float32)
    arr = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def skin_scene(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like background with skin-toned ellipses and darker centres: crude, but
    enough for NudeNet and Open-NSFW to produce non-trivial detections and scores."""
    img = photo(width, height, seed)
    draw = ImageDraw.Draw(img)
    rng = np.random.default_rng(seed)
    for _ in range(4):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = int(rng.integers(max(4, width // 12), max(5, width // 3)))
        draw.ellipse((x - r, y - int(r * 1.3), x + r, y + int(r * 1.3)), fill=(224, 172, 140))
        dot = max(2, r // 10)
        draw.ellipse((x - dot, y - dot, x + dot, y + dot), fill=(150, 80, 70))
    return img


def _size(megapixels: float, seed: int) -> tuple[int, int]:
    aspect = [4 / 3, 3 / 2, 16 / 9, 3 / 4, 1.0][seed % 5]
    height = int((megapixels * 1e6 / aspect) ** 0.5)
    return int(height * aspect), height


def bench_set(out: Path, count: int) -> list[Path]:
    """``count`` images: 2/3 JPEG across JPEG_SIZES_MP, 1/6 PNG, 1/6 WebP (~1 MP each)."""
    out.mkdir(parents=True, exist_ok=True)
    jpeg_plan = [mp for mp, share in JPEG_SIZES_MP for _ in range(share)]
    paths: list[Path] = []
    for i in range(count):
        kind = ["jpeg", "jpeg", "jpeg", "jpeg", "png", "webp"][i % 6]
        mp = jpeg_plan[i % len(jpeg_plan)] if kind == "jpeg" else 1.0
        w, h = _size(mp, i)
        path = out / f"{i:03d}_{kind}_{w}x{h}.{'jpg' if kind == 'jpeg' else kind}"
        if not path.exists():
            img = photo(w, h, seed=i)
            if kind == "jpeg":
                img.save(path, quality=88)
            elif kind == "png":
                img.save(path, optimize=False)
            else:
                img.save(path, quality=80)
        paths.append(path)
    return paths


def bomb_png(side: int = 40_000) -> bytes:
    """A tiny PNG whose header claims side×side pixels (1.6 Gpx at the default)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    comp = zlib.compressobj(9)
    row = b"\x00" + b"\x00" * (side // 8 + 1)
    body = b"".join(comp.compress(row) for _ in range(64)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def demo_set(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes] = {}
    for i, (w, h) in enumerate([(1600, 1200), (640, 480), (3000, 2000)]):
        buf = io.BytesIO()
        photo(w, h, seed=100 + i).save(buf, "JPEG", quality=88)
        files[f"photo_{i}.jpg"] = buf.getvalue()
    buf = io.BytesIO()
    photo(800, 800, seed=7).save(buf, "PNG")
    files["graphic.png"] = buf.getvalue()
    frames = [photo(320, 240, seed=200 + k) for k in range(12)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)
    files["animated.gif"] = buf.getvalue()
    files["truncated.jpg"] = files["photo_0.jpg"][: len(files["photo_0.jpg"]) // 2]
    files["empty.jpg"] = b""
    files["notes.txt"] = b"this is not an image\n"
    files["bomb.png"] = bomb_png()
    paths = []
    for name, data in files.items():
        (out / name).write_bytes(data)
        paths.append(out / name)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("set", choices=["bench", "demo"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--count", type=int, default=48)
    args = parser.parse_args()
    paths = bench_set(args.out, args.count) if args.set == "bench" else demo_set(args.out)
    print(f"{len(paths)} images in {args.out}")


if __name__ == "__main__":
    main()
