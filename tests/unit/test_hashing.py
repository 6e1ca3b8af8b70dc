"""Image hashes (worker.ingest.hashing): exact hashes of the bytes; PDQ equal to
ThreatExchange's own, hex and quality, on the same files (an EXIF-rotated file's too, as
``pdq_file``); robust to re-encoding, resizing and brightness, distinct across unrelated
images; crops and draft decoding measured."""

from __future__ import annotations

import dataclasses
import hashlib
import io
from pathlib import Path

import numpy as np
import pdqhash
import pytest
from PIL import Image, ImageEnhance
from threatexchange.signal_type.pdq.pdq_hasher import pdq_from_bytes, pdq_from_file
from threatexchange.signal_type.pdq.pdq_utils import simple_distance
from threatexchange.signal_type.pdq.signal import PdqSignal

from modgate.settings import DecodeSettings
from worker.ingest import hashing
from worker.ingest.decode import Frame, decode_image
from worker.ingest.hashing import (
    ImageHashes,
    exact_hashes,
    frame_pdq_file,
    pdq_distance,
    pdq_file_hash,
    pdq_hash,
    with_pdq,
)
from worker.tools.samples import photo, skin_scene

MATCH = 31  # Meta's recommended PDQ match distance
SIDE = 256  # the largest detector input with Open-NSFW: draft decodes stop at 2× this


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def full_frame(data: bytes) -> Image.Image:
    """The worker's own decode at full size (draft off), as the pipeline hashes it."""
    return decode_image(data, DecodeSettings(draft=False), SIDE).frames[0].image


# -- exact hashes ----------------------------------------------------------------------------


def test_exact_hashes_are_md5_and_sha256_of_the_bytes():
    data = encode(photo(64, 48, 1), "PNG")
    assert exact_hashes(data) == (hashlib.md5(data).hexdigest(), hashlib.sha256(data).hexdigest())
    assert exact_hashes(b"") == (
        "d41d8cd98f00b204e9800998ecf8427e",
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    )


# -- golden: ThreatExchange's PDQ of the same file ------------------------------------------

GOLDEN = [
    (photo, 640, 480, 1),
    (photo, 1024, 768, 2),
    (photo, 480, 640, 3),
    (skin_scene, 800, 600, 4),
    (skin_scene, 600, 600, 5),
    (photo, 3000, 2000, 6),  # draft decoding would reduce this one: the hash is of the full decode
]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize(("make", "w", "h", "seed"), GOLDEN)
def test_pdq_equals_threatexchange_on_the_same_file(tmp_path: Path, make, w, h, seed, fmt):
    path = tmp_path / f"image.{fmt.lower()}"
    path.write_bytes(encode(make(w, h, seed), fmt, **({"quality": 85} if fmt == "JPEG" else {})))
    te_hex, te_quality = pdq_from_file(path)
    ours = pdq_hash(full_frame(path.read_bytes()))
    assert ours == (te_hex, te_quality)
    assert pdq_hash(Image.open(path)) == (te_hex, te_quality)
    # The signal type HMA uses: the same hex (quality ≥ 50 here, else it returns "").
    assert te_quality >= 50
    assert PdqSignal.hash_from_file(path) == ours[0]


def with_orientation(img: Image.Image, orientation: int) -> bytes:
    """``img`` as the pixels a JPEG stores, tagged with EXIF ``orientation`` (a viewer turns
    it; ThreatExchange hashes it as stored)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=88, exif=exif.tobytes())


# ~0.5 MP (pdq by pdqhash itself), an odd size, and > 1 MP (pdq by the sampled filter).
ORIENTED = [(photo, 816, 612, 81), (skin_scene, 1001, 777, 82), (photo, 1500, 1000, 83)]


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize(("make", "w", "h", "seed"), ORIENTED)
def test_an_exif_rotated_jpeg_carries_threatexchanges_hash_of_the_file(
    tmp_path: Path, make, w, h, seed, orientation
):
    """ThreatExchange and HMA hash the pixels as stored, ignoring the EXIF orientation:
    ``pdq_file`` is that hash (hex and quality), ``pdq`` stays the hash of what a viewer sees."""
    path = tmp_path / "rotated.jpg"
    path.write_bytes(with_orientation(make(w, h, seed), orientation))
    frame = decode_image(path.read_bytes(), DecodeSettings(draft=False), SIDE).frames[0]
    assert frame.orientation == orientation
    hashed = with_pdq(ImageHashes(*exact_hashes(path.read_bytes())), [frame.image], frame.orientation)
    te_hex, te_quality = pdq_from_file(path)
    assert te_quality >= 50
    assert PdqSignal.hash_from_file(path) == te_hex
    if orientation == 1:
        assert hashed.pdq_file is None and (hashed.pdq, hashed.pdq_quality) == (te_hex, te_quality)
        assert hashed.match_pdqs == hashed.frame_pdqs
    else:
        assert hashed.pdq_file == (te_hex, te_quality)
        assert hashed.match_pdqs == (*hashed.frame_pdqs, hashed.pdq_file)
        # Why: the displayed frame's hash is too far from the list's to ever match it.
        assert pdq_distance(hashed.pdq, te_hex) > MATCH
    # pdq: ThreatExchange's hash of the image as displayed, saved without the tag (losslessly).
    shown = tmp_path / "shown.png"
    frame.image.save(shown)
    assert (hashed.pdq, hashed.pdq_quality) == pdq_from_file(shown)
    # The decode processes' preparer: the same.
    assert frame_pdq_file(frame) == hashed.pdq_file


@pytest.mark.parametrize("orientation", range(2, 9))
@pytest.mark.parametrize("size", [(40, 30), (63, 90), (64, 65), (200, 64)])
def test_small_rotated_frames_hash_as_threatexchange_hashes_the_file(tmp_path: Path, size, orientation):
    path = tmp_path / "small.jpg"
    path.write_bytes(with_orientation(photo(*size, 84), orientation))
    frame = decode_image(path.read_bytes(), DecodeSettings(), SIDE).frames[0]
    assert pdq_file_hash(frame.image, frame.orientation) == pdq_from_file(path)


def test_only_exif_orientations_are_undone():
    with pytest.raises(ValueError, match="EXIF orientation"):
        pdq_file_hash(photo(100, 80, 1), 9)
    # An animation's other frames and upright frames have none.
    img = photo(100, 80, 1)
    assert frame_pdq_file(Frame(img, 1.0, 0, 1)) is None
    assert frame_pdq_file(Frame(img, 1.0, 3, 6)) is None
    assert frame_pdq_file(Frame(img, 1.0, 0, 6)) == pdq_file_hash(img, 6)


def test_pdq_equals_threatexchange_on_greyscale_and_flat_images(tmp_path: Path):
    grey = tmp_path / "grey.jpg"
    grey.write_bytes(encode(photo(500, 400, 7).convert("L"), "JPEG", quality=90))
    assert pdq_hash(full_frame(grey.read_bytes())) == pdq_from_file(grey)
    flat = tmp_path / "flat.png"
    flat.write_bytes(encode(Image.new("RGB", (300, 200), (40, 90, 200)), "PNG"))
    hex_, quality = pdq_hash(full_frame(flat.read_bytes()))
    assert (hex_, quality) == pdq_from_file(flat)
    assert quality < 50  # flat images are unmatchable: ThreatExchange returns no hash
    assert PdqSignal.hash_from_file(flat) == ""


def test_hex_is_the_bits_in_pdqhash_order_as_one_big_endian_number():
    img = skin_scene(400, 300, 8)
    bits, quality = pdqhash.compute(np.asarray(img))
    hex_, q = pdq_hash(img)
    assert q == quality
    assert len(hex_) == 64 and hex_ == hex_.lower()
    assert format(int(hex_, 16), "0256b") == "".join(str(int(b)) for b in bits)


# -- distance --------------------------------------------------------------------------------


def test_pdq_distance():
    zero, ones = "0" * 64, "f" * 64
    assert pdq_distance(zero, zero) == 0
    assert pdq_distance(zero, ones) == 256
    assert pdq_distance(zero, "8" + "0" * 63) == 1
    assert pdq_distance(zero, "0" * 63 + "1") == 1
    assert pdq_distance(ones.upper(), ones) == 0
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = (rng.integers(0, 256, 32, dtype=np.uint8).tobytes().hex() for _ in range(2))
        assert pdq_distance(a, b) == simple_distance(a, b)


@pytest.mark.parametrize(
    "bad", ["", "0" * 63, "0" * 65, "g" + "0" * 63, "0x" + "0" * 62, "0_" + "0" * 62, " " + "0" * 63, None]
)
def test_pdq_distance_refuses_what_is_not_a_pdq_hash(bad):
    with pytest.raises(ValueError, match="not a PDQ hash"):
        pdq_distance("0" * 64, bad)
    with pytest.raises(ValueError, match="not a PDQ hash"):
        pdq_distance(bad, "0" * 64)


# -- with_pdq --------------------------------------------------------------------------------


def test_with_pdq_hashes_every_frame_and_keeps_the_exact_hashes():
    data = encode(photo(320, 240, 9), "PNG")
    base = ImageHashes(*exact_hashes(data))
    frames = [photo(320, 240, 9), skin_scene(320, 240, 10), photo(320, 240, 11)]
    hashed = with_pdq(base, frames)
    expected = tuple(pdq_hash(f) for f in frames)
    assert hashed.frame_pdqs == expected
    assert (hashed.pdq, hashed.pdq_quality) == expected[0]
    assert (hashed.md5, hashed.sha256) == exact_hashes(data)
    assert base.pdq is None and base.frame_pdqs == ()  # frozen: a new value, the old one untouched
    with pytest.raises(dataclasses.FrozenInstanceError):
        hashed.pdq = None  # type: ignore[misc]
    assert with_pdq(hashed, []) == base
    assert hashed.pdq_file is None  # upright (orientation 1): no second hash
    turned = with_pdq(base, frames, orientation=6)
    assert turned.frame_pdqs == expected and turned.pdq_file == pdq_file_hash(frames[0], 6)
    assert with_pdq(turned, []) == base


def test_non_rgb_frames_are_hashed_as_their_rgb_conversion():
    img = photo(200, 150, 12)
    assert pdq_hash(img.convert("L")) == pdq_hash(img.convert("L").convert("RGB"))
    assert pdq_hash(img.convert("RGBA")) == pdq_hash(img)


# -- robustness on generated images ----------------------------------------------------------

ROBUST = [(photo, s) for s in (20, 21, 22)] + [(skin_scene, s) for s in (23, 24, 25)]


@pytest.mark.parametrize(("make", "seed"), ROBUST)
def test_edits_stay_within_the_match_distance(make, seed):
    img = make(800, 600, seed)
    original, quality = pdq_hash(img)
    assert quality >= 50
    edits = {
        "jpeg_q60": Image.open(io.BytesIO(encode(img, "JPEG", quality=60))),
        "resized_50": img.resize((400, 300), Image.Resampling.BILINEAR),
        "brightness_115": ImageEnhance.Brightness(img).enhance(1.15),
    }
    moved = {name: pdq_distance(original, pdq_hash(edit)[0]) for name, edit in edits.items()}
    assert all(d <= MATCH for d in moved.values()), moved


def test_unrelated_images_are_never_within_the_match_distance():
    """200 generated images of quality ≥ 50 (flatter ones, which PDQ refuses to match, are
    skipped), every pair compared: the closest pair measured 92 bits apart."""
    shapes = [(320, 240), (240, 320), (300, 300), (400, 225)]
    hashes: list[str] = []
    seed = 5000
    while len(hashes) < 200:
        make = photo if seed % 2 == 0 else skin_scene
        hex_, quality = pdq_hash(make(*shapes[seed % len(shapes)], seed))
        if quality >= 50:
            hashes.append(hex_)
        seed += 1
    bits = np.unpackbits(np.frombuffer(bytes.fromhex("".join(hashes)), np.uint8).reshape(-1, 32), axis=1)
    b = bits.astype(np.int32)
    # Hamming distance of every pair at once: bits set in one and not the other, both ways.
    distances = b @ (1 - b).T + (1 - b) @ b.T
    pairs = distances[np.triu_indices(len(hashes), k=1)]
    assert len(set(hashes)) == 200
    assert pairs.min() > MATCH, f"closest pair {pairs.min()} bits apart"
    i, j = 0, 1  # the vectorised distance agrees with pdq_distance
    assert distances[i, j] == pdq_distance(hashes[i], hashes[j])


def test_crops_move_the_hash():
    """PDQ is not crop-robust, and modgate promises nothing for crops. Measured here
    (6 images, 800×600, a share cut off the top and left; bench/results/hashing.json has 24):
    3 % moved 44–82 bits, 5 % 82–122, 10 % 104–142."""
    for make, seed in ROBUST:
        img = make(800, 600, seed)
        original, _ = pdq_hash(img)
        for share in (0.03, 0.05, 0.10):
            dx, dy = round(800 * share), round(600 * share)
            assert pdq_distance(original, pdq_hash(img.crop((dx, dy, 800, 600)))[0]) > 0


def test_draft_decoded_frames_hash_differently_from_the_full_decode():
    """Why the hash comes from a full decode: the PIL path's draft frame (DCT scaling to
    2× the largest detector input) of these large JPEGs gives a hash that is not
    ThreatExchange's. These five moved 0–8 bits; bench/bench_hashing.py measured up to 12
    (mean 3.7) on the 24 reduced JPEGs of its 48 of 0.3–12 MP."""
    moved = []
    for i, (w, h) in enumerate([(1884, 1060), (2236, 2236), (2581, 1936), (3463, 2309), (4000, 3000)]):
        data = encode((photo if i % 2 == 0 else skin_scene)(w, h, 40 + i), "JPEG", quality=88)
        draft = decode_image(data, DecodeSettings(), SIDE).frames[0]
        assert draft.scale < 1.0
        moved.append(pdq_distance(pdq_hash(draft.image)[0], pdq_hash(full_frame(data))[0]))
    assert max(moved) > 0, moved
    assert max(moved) <= MATCH, moved


# -- large frames: PDQ's filter evaluated only where PDQ samples it ------------------------

LARGE = [(1884, 1060), (2236, 2236), (2581, 1936), (3463, 2309), (4000, 3000)]


def test_large_frames_hash_exactly_as_threatexchange_does():
    """Frames over DIRECT_MAX_PX go to pdq_buffer64 (~20 core-ms at 12 MP instead of
    pdqhash's ~330): the same hex and quality as ThreatExchange's full-decode hash. Measured
    bound: 0 bits on these and on the bench's 48 images of 0.3–12 MP."""
    for i, (w, h) in enumerate(LARGE):
        assert w * h > hashing.DIRECT_MAX_PX
        data = encode((photo if i % 2 == 0 else skin_scene)(w, h, 40 + i), "JPEG", quality=88)
        assert pdq_hash(full_frame(data)) == pdq_from_bytes(data)


@pytest.mark.parametrize(
    "size", [(64, 64), (65, 700), (700, 65), (127, 129), (129, 128), (5000, 300), (1003, 997)]
)
def test_sampled_filter_equals_pdqhash_on_any_shape(size):
    rgb = np.asarray(skin_scene(*size, 77))
    bits, quality = pdqhash.compute(rgb)
    expected = np.packbits(bits.astype(np.uint8)).tobytes().hex(), int(quality)
    assert hashing.pdq_from_buffer64(hashing.pdq_buffer64(rgb)) == expected


def test_box_pre_reduction_moves_bits_where_sampling_does_not():
    """Why not an integer box pre-reduction before pdqhash: at 512 px on the short side it
    moved up to 10 bits on the bench set (this one image: > 0), the sampled filter none."""
    img = full_frame(encode(photo(2581, 1936, 44), "JPEG", quality=88))
    reference = pdq_from_bytes(encode(photo(2581, 1936, 44), "JPEG", quality=88))
    assert pdq_hash(img) == reference
    moved = pdq_distance(pdq_hash(img.reduce(min(img.size) // 512))[0], reference[0])
    assert 0 < moved <= MATCH
