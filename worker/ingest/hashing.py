"""Hashes of an image for known-content matching (hash banks) and the verdict cache.

Exact hashes (MD5, SHA-256) are of the original bytes, before any decoding. PDQ is Meta's
perceptual hash, computed by the maintained ``pdqhash`` package on an RGB frame and written
as ThreatExchange writes it: the 256 bits in ``pdqhash.compute`` order read as one
big-endian number, 64 lowercase hex digits, so hashes from ThreatExchange and HMA lists
compare with ours bit for bit. A golden test checks that the hex and the quality equal
``threatexchange``'s own PDQ (``pdq_hasher.pdq_from_file``) of the same JPEG and PNG files.

PDQ is built from the full decode. ThreatExchange's Python hasher (what HMA runs) hashes
every pixel of the full-size decode, and a smaller frame gives a different hash. Measured
by bench/bench_hashing.py (results/hashing.json) on 48 photo-like JPEGs of 0.3–12 MP:

- The PIL path's JPEG draft decode (DCT scaling to 2× the largest detector input: 512 px
  with Open-NSFW) reduced the 24 images over ~1 MP; their hashes moved 0–12 bits from the
  full decode's (mean 3.7; the unreduced ones match exactly). Decision: 12 bits of the
  31-bit match budget is too much to spend on a decoding shortcut, so the hash comes from
  a full decode: with ``hashing.pdq=full`` (the default) the pipeline turns draft
  decoding off while PDQ is on (with NudeNet in the ensemble it is off anyway);
  ``hashing.pdq=frame`` trades the bits for draft speed. A larger reduced decode is no way
  around it: a 1/2-scale draft moved 0–14 bits.
- Cost of the full frame's hash, core-ms per image (mean, one core): ``pdqhash`` on the
  whole frame ~4 ms at 0.3 MP, ~16 at 1 MP, ~38 at 2 MP, ~128 at 5 MP, ~260 at 8 MP, ~345
  at 12 MP, 4–9× the full JPEG decode (1.7 to 40 ms). Nearly all of it is PDQ's filter
  (two box passes per axis over every pixel) of which PDQ keeps 64×64 samples. Frames over
  ``DIRECT_MAX_PX`` (1 MP) are therefore hashed by ``pdq_buffer64``: the filter is linear,
  so its 64×64 samples are ``W(h) @ luma @ W(w).T`` with PDQ's exact per-axis weights,
  computed from the ~H/64 rows each sample reaches: ~5 ms at 2 MP, ~10 at 5, ~16 at 8, ~20
  at 12 MP (17× less), and the same hex and quality as ThreatExchange's on all 48 images
  (and on odd shapes, tests/unit/test_hashing.py). Meta's reference C++ hasher resized to
  512×512 first, and its paper recommends it, for the same reason; a box pre-reduction
  (``Image.reduce(k)`` to ≥ 1024, 768, 512, 384, 256 px on the short side, then
  ``pdqhash``) moved up to 4, 10, 10, 18, 16 bits (mean 0.4, 1.0, 1.9, 4.6, 4.6): the
  sampled filter is both cheaper and exact, so no reduction is used. ``exact_hashes`` ≤ 4 ms.
- The tensor path hashes the frame where it is decoded (worker/device/pdq_tensor.py): the
  same two products on the device in float64, only the 64×64 buffer copied to the host;
  0 bits from ThreatExchange's hash on the 48 images (measured with torch on the CPU).

EXIF orientation: ``pdq`` is of the frame as displayed (decode applies the orientation);
ThreatExchange and HMA hash the pixels as stored, ignoring it: 110–146 bits away on the
images measured, so a list entry of a rotated JPEG never matched its upload. Where the
orientation is not 1 the first frame also gets ``pdq_file``, the PDQ of the pixels as
stored, and the banks are matched on both. It takes no second decode and no copy: the
stored frame is a flip and/or transpose of the displayed one, so its 64×64 buffer is the
same two products with PDQ's axis weights reversed and, for orientations 5–8, swapped and
the result transposed (``pdq_stored_weights``; the tensor path's ``device_buffer64`` too).
Measured on photo-like JPEGs, each of the 8 orientations: 0 bits and the same quality as
``threatexchange``'s hash of the file at 816×612, 1001×777, 1500×1000 and 4000×3000 (torch
on the CPU likewise), and at 63×90 and 40×30 (under 64 px a side: a reordered copy, a few
KB, hashed by ``pdqhash``); 15–19 core-ms more at 12 MP, what ``pdq`` itself costs there.
The golden tests (tests/unit/test_hashing.py, test_pipeline_hashes.py) hold it. Like
``pdq``, it is of the frame decode gave (draft decoding: above). ``pdqhash``'s dihedral
variants of the displayed frame's hash, free from its DCT, were 0–8 bits off: PDQ's
sampling grid and box windows are not symmetric. Only the first frame: EXIF orientation on
an animation is rare.

Other frames that are not the file's pixel matrix keep a hash of what a viewer sees, apart
from ThreatExchange's of the file (one image each, in bits): transparent images (composited
on white; ThreatExchange ignores alpha: 66), palette PNGs (ThreatExchange hashes the
palette indices as grey: 88).

Robustness on generated photo-like images (tests/unit/test_hashing.py and the bench, 800×600):
JPEG re-encoded at quality 60 moved ≤ 6 bits, resized to 50 % ≤ 10, brightness +15 % ≤ 20
(a match is ≤ 31); 200 unrelated images of quality ≥ 50 were ≥ 92 bits apart. PDQ is not
crop-robust and nothing is promised for crops: cutting 3 % off the top and left moved 24
images 40–72 bits (mean 55), 5 % 70–110, 10 % 102–146; the same share cut evenly from all
sides 18–40 (mean 28), 30–62 and 54–110. Flat images have low quality (< 50) and collide;
banks neither import nor match them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import numpy as np
import pdqhash
from PIL import Image

_PDQ_HEX = re.compile(r"[0-9a-fA-F]{64}")
_PDQ_LOWER = re.compile(r"[0-9a-f]{64}")
# What the score cache's entries hold of the hashes; part of its key, so a change (2:
# ``pdq_file`` of EXIF-rotated files) never reuses entries that lack a hash.
HASHES_REVISION = 2


@dataclass(frozen=True)
class ImageHashes:
    md5: str  # hex of the original bytes
    sha256: str
    # (hex, quality) of every hashed frame, the first included: an animation matches a bank
    # on any sampled frame. Hex: 64 lowercase digits, ThreatExchange's order; quality 0–100,
    # below 50 a PDQ hash is not matched.
    frame_pdqs: tuple[tuple[str, int], ...] = ()
    # (hex, quality) of the first frame's pixels as stored in the file, before its EXIF
    # orientation: ThreatExchange's hash of the file. Only when the orientation is not 1.
    pdq_file: tuple[str, int] | None = None

    @property
    def pdq(self) -> str | None:
        """The first frame's PDQ (the verdict's ``hashes.pdq``)."""
        return self.frame_pdqs[0][0] if self.frame_pdqs else None

    @property
    def pdq_quality(self) -> int | None:
        return self.frame_pdqs[0][1] if self.frame_pdqs else None

    @property
    def match_pdqs(self) -> tuple[tuple[str, int], ...]:
        """Every PDQ the banks are matched against: each frame's, and ``pdq_file``."""
        return self.frame_pdqs if self.pdq_file is None else (*self.frame_pdqs, self.pdq_file)

    def with_pdqs(
        self, frame_pdqs: Sequence[tuple[str, int]], pdq_file: tuple[str, int] | None = None
    ) -> ImageHashes:
        """These exact hashes with the frames' PDQs (and the file's)."""
        return replace(self, frame_pdqs=tuple(frame_pdqs), pdq_file=pdq_file)


def exact_hashes(data: bytes) -> tuple[str, str]:
    """(MD5, SHA-256) of ``data``, lowercase hex."""
    # MD5 is here to match industry hash lists, not for security.
    return hashlib.md5(data, usedforsecurity=False).hexdigest(), hashlib.sha256(data).hexdigest()


# Frames up to this many pixels go to ``pdqhash`` itself; larger ones (where its full-frame
# filter costs 4–10× the decode) to ``pdq_buffer64``, PDQ's filter evaluated only where
# PDQ samples it: the same bits on every image measured (module docstring).
DIRECT_MAX_PX = 1_000_000
# PDQ's 64×64 downsample, its luma weights and its DCT (pdqhashing.cpp: 16 rows of the
# 64-point DCT-II basis, frequencies 1–16).
_GRID = 64
_LUMA = np.array([0.299, 0.587, 0.114])
_DCT = np.sqrt(2.0 / _GRID) * np.cos(
    (np.pi / 2.0 / _GRID) * np.arange(1, 17)[:, None] * (2 * np.arange(_GRID)[None, :] + 1)
)


# EXIF orientation → how the pixels as stored in the file are read from the displayed
# (oriented) frame D: (transposed, rows reversed, columns reversed), the stored matrix being
# D, or D.T when transposed, with those axes reversed. The inverse of Pillow's
# ``ImageOps.exif_transpose`` (2: FLIP_LEFT_RIGHT ... 6: ROTATE_270, 8: ROTATE_90).
_STORED = {
    1: (False, False, False),
    2: (False, False, True),
    3: (False, True, True),
    4: (False, True, False),
    5: (True, False, False),
    6: (True, True, False),
    7: (True, True, True),
    8: (True, False, True),
}


def _rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, np.ndarray):
        return image
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


def _pdqhash(rgb: np.ndarray) -> tuple[str, int]:
    bits, quality = pdqhash.compute(rgb)
    # packbits reads bits[0] as the most significant bit of byte 0: the big-endian number
    # ThreatExchange builds from the joined bit string.
    return np.packbits(bits.astype(np.uint8)).tobytes().hex(), int(quality)


def pdq_hash(image: Image.Image | np.ndarray) -> tuple[str, int]:
    """(PDQ hex, quality) of an RGB image (or (H, W, 3) uint8 array), as ThreatExchange
    computes and writes it. Other modes are converted by Pillow (decode's frames are RGB
    already)."""
    rgb = _rgb(image)
    if rgb.shape[0] * rgb.shape[1] > DIRECT_MAX_PX and min(rgb.shape[:2]) >= _GRID:
        return pdq_from_buffer64(pdq_buffer64(rgb))
    return _pdqhash(rgb)


def pdq_file_hash(image: Image.Image | np.ndarray, orientation: int) -> tuple[str, int]:
    """(PDQ hex, quality) of the pixels as the file stores them, from the frame as displayed
    after EXIF ``orientation`` (1–8) was applied: ThreatExchange's hash of the file, without
    undoing the orientation. PDQ's sampled filter runs on the displayed frame with its
    weights reordered (``pdq_buffer64``), at the cost of one more hash and no copy; a frame
    under 64 px on a side goes to ``pdqhash`` as a reordered copy (a few KB)."""
    rgb = _rgb(image)
    if min(rgb.shape[:2]) >= _GRID:
        return pdq_from_buffer64(pdq_buffer64(rgb, orientation))
    transposed, flip_rows, flip_cols = _stored(orientation)
    stored = rgb.transpose(1, 0, 2) if transposed else rgb
    stored = stored[:: -1 if flip_rows else 1, :: -1 if flip_cols else 1]
    return _pdqhash(np.ascontiguousarray(stored))


def _stored(orientation: int) -> tuple[bool, bool, bool]:
    try:
        return _STORED[orientation]
    except KeyError:
        raise ValueError(f"not an EXIF orientation (1-8): {orientation!r}") from None


def pdq_stored_weights(h: int, w: int, orientation: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """(R, C, transposed) for a displayed frame D of ``h``×``w`` pixels and its EXIF
    ``orientation``: PDQ's 64×64 buffer of the pixels as stored is ``R @ D @ C.T``, transposed
    when ``transposed``. A reversed stored axis reverses the weights' columns (the same
    rows of D, weighted end to end); for orientations 5–8 the stored height is D's width,
    so D's rows take the stored width's weights and the product comes out transposed.
    Read-only views of ``pdq_axis_weights``."""
    transposed, flip_rows, flip_cols = _stored(orientation)
    rows, cols = pdq_axis_weights(h), pdq_axis_weights(w)
    if transposed:
        flip_rows, flip_cols = flip_cols, flip_rows  # D's rows are the stored columns
    return rows[:, ::-1] if flip_rows else rows, cols[:, ::-1] if flip_cols else cols, transposed


@lru_cache(maxsize=256)
def pdq_axis_weights(n: int) -> np.ndarray:
    """(64, n) float64: along one axis of ``n`` pixels, PDQ's two box-filter passes (window
    ``computeJaroszFilterWindowSize(n, 64)``, each output the mean of the inputs its window
    covers, fewer at the edges: ``box1DFloat``) followed by its decimation (the pixel at
    ``int((i + 0.5) * n / 64)``). Both are linear, so PDQ's 64×64 buffer of a luma matrix L
    is ``W(h) @ L @ W(w).T`` and only these 64 rows of the filtered image are ever computed.
    Read-only (cached)."""
    window = (n + 2 * _GRID - 1) // (2 * _GRID)
    half = (window + 2) // 2
    o = np.arange(n)
    lo = np.maximum(0, o - (window - half))
    hi = np.minimum(n, o + half)
    inv = 1.0 / (hi - lo)
    weights = np.zeros((_GRID, n))
    for row, at in enumerate(((np.arange(_GRID) + 0.5) * n / _GRID).astype(np.int64)):
        # The second pass at ``at`` averages first-pass outputs x in [lo, hi); each of those
        # averages the inputs [lo[x], hi[x]): a step function, built from its edges.
        xs = np.arange(lo[at], hi[at])
        edges = np.zeros(n + 1)
        np.add.at(edges, lo[xs], inv[xs] * inv[at])
        np.add.at(edges, hi[xs], -inv[xs] * inv[at])
        a, b = lo[lo[at]], hi[hi[at] - 1]  # exact zeros outside (a cumsum leaves residue)
        weights[row, a:b] = np.cumsum(edges[:b])[a:b]
    weights.flags.writeable = False
    return weights


def pdq_buffer64(rgb: np.ndarray, orientation: int = 1) -> np.ndarray:
    """PDQ's 64×64 luma buffer (blurred and decimated) of an (H, W, 3) uint8 image, from
    only the rows the vertical filter reaches for each of the 64 sampled rows (about the
    image once, in float32 slices of ~H/64 rows), then the luma and the horizontal filter
    on 64 rows: ~20 core-ms at 12 MP where pdqhash's full-frame filter costs ~330. With an
    EXIF ``orientation`` other than 1, ``rgb`` is the displayed frame and the buffer is that
    of the pixels as stored (``pdq_stored_weights``), at the same cost."""
    h, w, _ = rgb.shape
    rows, cols, transposed = pdq_stored_weights(h, w, orientation)
    flat = rgb.reshape(h, w * 3)
    filtered = np.empty((_GRID, w * 3))
    for i in range(_GRID):
        nz = np.flatnonzero(rows[i])
        a, b = nz[0], nz[-1] + 1
        filtered[i] = rows[i, a:b].astype(np.float32) @ flat[a:b].astype(np.float32)
    luma = filtered.reshape(_GRID, w, 3) @ _LUMA
    buffer = luma @ cols.T
    return buffer.T if transposed else buffer


def pdq_from_buffer64(buffer: np.ndarray) -> tuple[str, int]:
    """(PDQ hex, quality) from PDQ's 64×64 luma buffer: ``pdqImageDomainQualityMetric``,
    ``dct64To16`` and ``pdqBuffer16x16ToBits`` (a bit is set where its coefficient is above
    the median; torben's median of 256 values is the 128th smallest), bit k of the hash at
    row k // 16, column k % 16, written as one big-endian number."""
    a = np.asarray(buffer, dtype=np.float64)
    a32 = a.astype(np.float32)
    gradient = sum(
        int(np.abs(np.trunc(d * np.float32(100) / np.float32(255))).sum())
        for d in (a32[:-1, :] - a32[1:, :], a32[:, :-1] - a32[:, 1:])
    )
    quality = min(100, gradient // 90)
    coefficients = (_DCT @ a @ _DCT.T).ravel()
    median = np.partition(coefficients, 127)[127]
    value = 0
    for k in np.flatnonzero(coefficients > median):
        value |= 1 << int(k)
    return format(value, "064x"), quality


def checked_pdq(v: object) -> tuple[str, int]:
    """``[hex, quality]`` (or a tuple) that crossed a process boundary (the inference
    socket, a cache entry in Redis), as written by this module: 64 lowercase hex digits and
    an integer quality 0–100. ValueError otherwise."""
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise ValueError(f"a PDQ is not [hex, quality]: {v!r:.80}")
    hex_, quality = v
    if not isinstance(hex_, str) or not _PDQ_LOWER.fullmatch(hex_):
        raise ValueError(f"not a PDQ hash (64 lowercase hex digits): {hex_!r:.80}")
    if type(quality) is not int or not 0 <= quality <= 100:
        raise ValueError(f"not a PDQ quality (0-100): {quality!r:.50}")
    return hex_, quality


def pdq_distance(a: str, b: str) -> int:
    """Hamming distance of two PDQ hashes in hex (0–256); ValueError if either is not 64
    hex digits."""
    return (_pdq_int(a) ^ _pdq_int(b)).bit_count()


def _pdq_int(value: str) -> int:
    # int(x, 16) alone would accept "0x…", "_" and spaces, and any length.
    if not isinstance(value, str) or not _PDQ_HEX.fullmatch(value):
        raise ValueError(f"not a PDQ hash (64 hex digits): {value!r}")
    return int(value, 16)


def with_pdq(hashes: ImageHashes, frames: Sequence[Image.Image], orientation: int = 1) -> ImageHashes:
    """``hashes`` with the PDQ of each frame; the first frame's is ``pdq``, and, where its
    EXIF ``orientation`` (as decode applied it) is not 1, ``pdq_file`` (the first frame's
    only: an animation with an EXIF orientation is rare). No frames: no PDQ."""
    pdqs = [pdq_hash(frame) for frame in frames]
    stored = pdq_file_hash(frames[0], orientation) if pdqs and orientation != 1 else None
    return hashes.with_pdqs(pdqs, stored)


# Keys of a frame's PDQ, and of its file's (``pdq_file``), among the inputs a decode process
# prepares (the frame stays there).
PDQ_KEY = "pdq"
PDQ_FILE_KEY = "pdq_file"


def frame_pdq(frame: Any) -> tuple[str, int]:
    """(PDQ hex, quality) of a decoded ``Frame``: a preparer the decode processes run beside
    the detectors' (picklable: a module-level function)."""
    return pdq_hash(frame.image)


def frame_pdq_file(frame: Any) -> tuple[str, int] | None:
    """``pdq_file`` of a decoded ``Frame``: the first frame's, where its EXIF orientation is
    not 1; else None. A preparer, as ``frame_pdq``."""
    if frame.index != 0 or frame.orientation == 1:
        return None
    return pdq_file_hash(frame.image, frame.orientation)
