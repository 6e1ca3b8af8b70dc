"""``modgate scan --bank`` as a user runs it: hash lists on disk decide verdicts before the
models (a real subprocess, the real detectors, bank files in the formats lists come in)."""

import hashlib
import json

from PIL import Image
from threatexchange.signal_type.pdq.pdq_hasher import pdq_from_file

from tests.integration.test_scan_cli import jpeg_bytes, run
from worker.ingest.hashing import pdq_distance, pdq_hash
from worker.tools.samples import photo


def _verdicts(stdout):
    return {
        json.loads(line)["source"]["path"].rsplit("/", 1)[-1]: json.loads(line)
        for line in stdout.splitlines()
    }


def test_exact_and_pdq_banks_flag_allow_and_skip_the_models(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i, name in enumerate(["known.jpg", "reencoded.jpg", "allowed.jpg", "other.jpg"]):
        (images / name).write_bytes(jpeg_bytes(480, 360, seed=i))
    # "reencoded" becomes a re-encode of "known": other bytes, the same picture (PDQ).
    with Image.open(images / "known.jpg") as im:
        im.save(images / "reencoded.jpg", "JPEG", quality=60)
        known_pdq, _ = pdq_hash(im.convert("RGB"))
    md5s = tmp_path / "md5.txt"
    md5s.write_text(f"# take-downs\n{hashlib.md5((images / 'known.jpg').read_bytes()).hexdigest()},case 1\n")
    pdqs = tmp_path / "pdq.csv"
    pdqs.write_text(f"hash,note,quality\n{known_pdq},case 1,100\n")
    allow = tmp_path / "allow.txt"
    allow.write_text(hashlib.sha256((images / "allowed.jpg").read_bytes()).hexdigest() + "\n")
    result = run(
        [
            "scan", str(images), "--detectors", "open_nsfw", "--no-progress",
            "--bank", f"takedowns={md5s}", "--bank", f"near={pdqs}:review:sexual",
            "--bank", f"allow={allow}:safe:illegal_activity:sha256",
        ]
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    got = _verdicts(result.stdout)
    known, near, allowed, other = (got[n] for n in ["known.jpg", "reencoded.jpg", "allowed.jpg", "other.jpg"])
    # An exact unsafe match: judged before decode, no model ran.
    assert known["decision"] == "unsafe" and known["primary_category"] == "illegal_activity"
    assert known["detectors"] == {} and known["matches"][0]["bank"] == "takedowns"
    assert known["categories"]["illegal_activity"]["drivers"] == ["bank:takedowns"]
    # A near (PDQ) review match: the models ran, the verdict is at least review.
    assert near["decision"] in ("review", "unsafe") and "open_nsfw" in near["detectors"]
    (match,) = near["matches"]
    assert match["bank"] == "near" and match["kind"] == "pdq" and 0 < match["distance"] <= 31
    assert allowed["decision"] == "safe" and allowed["matches"][0]["action"] == "safe"
    assert (
        other["matches"] == []
        and other["hashes"]["md5"] == hashlib.md5((images / "other.jpg").read_bytes()).hexdigest()
    )


def test_a_threatexchange_list_matches_an_exif_rotated_upload(tmp_path):
    """ThreatExchange (and HMA) hash a file's pixels as stored, ignoring its EXIF
    orientation: a list entry of a phone photo taken sideways is that hash. Scanning the
    same file matches it, and the verdict carries that hash as ``hashes.pdq_file``."""
    images = tmp_path / "images"
    images.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    # Halved it would be under the draft target (2× Open-NSFW's input): decoded full size.
    photo(1000, 750, 90).save(images / "sideways.jpg", "JPEG", quality=90, exif=exif.tobytes())
    listed, quality = pdq_from_file(images / "sideways.jpg")
    bank = tmp_path / "te.pdq.csv"
    bank.write_text(f"hash,quality\n{listed},{quality}\n")
    result = run(["scan", str(images), "--detectors", "open_nsfw", "--no-progress", "--bank", f"te={bank}"])
    assert result.returncode == 0, result.stderr
    verdict = _verdicts(result.stdout)["sideways.jpg"]
    assert verdict["hashes"]["pdq_file"] == listed and verdict["hashes"]["pdq_file_quality"] == quality
    assert pdq_distance(verdict["hashes"]["pdq"], listed) > 31  # as displayed: not the list's
    assert verdict["decision"] == "unsafe" and verdict["detectors"] == {}  # judged by the bank
    (match,) = verdict["matches"]
    assert (match["bank"], match["kind"], match["hash"], match["distance"]) == ("te", "pdq", listed, 0)


def test_a_malformed_bank_file_is_a_usage_error_naming_the_line(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes(64, 64))
    bad = tmp_path / "bad.txt"
    bad.write_text("d41d8cd98f00b204e9800998ecf8427e\nnot-a-hash\n")
    result = run(["scan", str(tmp_path / "a.jpg"), "--no-progress", "--bank", f"b={bad}"])
    assert result.returncode == 2 and "bad.txt:2" in result.stderr and "Traceback" not in result.stderr
    result = run(["scan", str(tmp_path / "a.jpg"), "--no-progress", "--bank", "nofile"])
    assert result.returncode == 2 and "NAME=FILE" in result.stderr
