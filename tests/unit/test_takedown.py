"""A verdict's hashes as bank entries (modgate/takedown.py): the bank's kind, both PDQs of
an EXIF-rotated image, PDQ's quality rule, and verdicts that give nothing."""

from __future__ import annotations

import json

import pytest

from modgate.banks import BankEntry, BankFormatError
from modgate.takedown import read_verdict_lines, verdict_hashes

PDQ = "f" * 32 + "0" * 32
PDQ_FILE = "0" * 32 + "f" * 32
VID = "1" * 32


def verdict(**hashes) -> dict:
    return {
        "id": VID,
        "status": "ok",
        "source": {"kind": "s3", "uri": "s3://b/k", "sha256": "ab" * 32},
        "hashes": {"pdq": PDQ, "pdq_quality": 88, "md5": "cd" * 16, **hashes},
    }


def test_each_kind_takes_its_hash_noted_with_the_verdict():
    note = f"verdict {VID}"
    assert verdict_hashes(verdict(), "pdq") == ([BankEntry(PDQ, note, 88)], "")
    assert verdict_hashes(verdict(), "md5") == ([BankEntry("cd" * 16, note)], "")
    assert verdict_hashes(verdict(), "sha256")[0] == [BankEntry("ab" * 32, note)]


def test_a_rotated_images_file_pdq_goes_in_beside_the_displayed_ones():
    rotated = verdict(pdq_file=PDQ_FILE, pdq_file_quality=91)
    entries, _ = verdict_hashes(rotated, "pdq")
    assert [(e.hash, e.quality) for e in entries] == [(PDQ, 88), (PDQ_FILE, 91)]
    # The same hash twice (a symmetric image) is one entry.
    same, _ = verdict_hashes(verdict(pdq_file=PDQ, pdq_file_quality=88), "pdq")
    assert len(same) == 1


def test_low_quality_pdqs_are_refused_one_by_one():
    flat = verdict(pdq_quality=12)
    entries, why = verdict_hashes(flat, "pdq")
    assert entries == [] and "quality 12 is below 50" in why
    # The file's hash may still qualify where the displayed frame's does not.
    entries, why = verdict_hashes(verdict(pdq_quality=12, pdq_file=PDQ_FILE, pdq_file_quality=60), "pdq")
    assert [e.hash for e in entries] == [PDQ_FILE] and why == ""


def test_verdicts_without_a_usable_hash_say_why():
    error = {"id": "2" * 32, "status": "error", "source": {"kind": "s3", "uri": "s3://b/k"}}
    assert "an error verdict" in verdict_hashes(error, "md5")[1]
    bad = verdict(md5="not-hex")
    assert verdict_hashes(bad, "md5") == ([], f"verdict {VID}: not a md5 hash (not hexadecimal): 'not-hex'")
    assert "not objects" in verdict_hashes({"id": "3", "hashes": "pdq"}, "pdq")[1]


def test_verdict_lines_name_the_line_that_is_not_json(tmp_path):
    path = tmp_path / "v.jsonl"
    path.write_text(json.dumps(verdict()) + "\n\n[1]\n")
    lines = read_verdict_lines(path)
    assert next(lines)["id"] == VID
    with pytest.raises(BankFormatError, match=r"v\.jsonl:3: not a JSON verdict"):
        next(lines)
