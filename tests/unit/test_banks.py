"""Matching against banks in memory (worker/judge/banks.py): exact kinds, PDQ within each
bank's distance, PDQ's quality rule, banks from files, hashes given one by one as entries."""

from __future__ import annotations

import hashlib

import pytest

from modgate.banks import BankEntry, BankFormatError, BankSpec
from worker.judge.banks import BankSet, ExactBank, PdqBank, entries_from_hashes, new_bank

PDQ = "f" * 32 + "0" * 32


def near(h: str, bits: int) -> str:
    """``h`` with its lowest ``bits`` bits flipped."""
    return f"{int(h, 16) ^ ((1 << bits) - 1):064x}"


def spec(name: str, kind: str, **kw) -> BankSpec:
    return BankSpec(name=name, kind=kind, **kw)


def test_exact_banks_match_the_bytes_digests():
    data = b"an image"
    md5, sha = hashlib.md5(data).hexdigest(), hashlib.sha256(data).hexdigest()
    banks = BankSet(
        [
            new_bank(spec("md5s", "md5", action="review", category="violence"), [md5]),
            new_bank(spec("shas", "sha256", action="safe"), [sha]),
            new_bank(spec("other", "md5"), [hashlib.md5(b"else").hexdigest()]),
        ]
    )
    found = {m.bank: m for m in banks.match_exact(md5.upper(), sha)}
    assert set(found) == {"md5s", "shas"}
    assert (found["md5s"].action, found["md5s"].category, found["md5s"].distance) == ("review", "violence", 0)
    assert found["shas"].hash == sha and found["shas"].kind == "sha256"
    assert banks.match_exact(None, None) == []
    assert banks.match_exact(hashlib.md5(b"x").hexdigest(), None) == []


def test_pdq_matches_within_each_banks_distance():
    banks = BankSet(
        [new_bank(spec("wide", "pdq"), [PDQ]), new_bank(spec("tight", "pdq", max_distance=5), [PDQ])]
    )
    at = {d: {m.bank: m.distance for m in banks.match_pdq([(near(PDQ, d), 90)])} for d in (0, 5, 6, 31, 32)}
    assert at[0] == {"wide": 0, "tight": 0}
    assert at[5] == {"wide": 5, "tight": 5}
    assert at[6] == {"wide": 6}
    assert at[31] == {"wide": 31}
    assert at[32] == {}


def test_pdq_quality_below_50_is_never_matched():
    banks = BankSet([new_bank(spec("b", "pdq"), [PDQ])])
    assert banks.match_pdq([(PDQ, 49)]) == []
    assert [m.distance for m in banks.match_pdq([(PDQ, 50)])] == [0]
    assert [m.distance for m in banks.match_pdq([(PDQ, None)])] == [0]  # quality unknown


def test_frames_of_an_animation_report_each_bank_hash_once_at_its_nearest():
    other = "0" * 64
    banks = BankSet([new_bank(spec("b", "pdq"), [PDQ, other])])
    found = banks.match_pdq(
        [(near(PDQ, 9), 80), (near(PDQ, 2), 80), (near(other, 4), 30), (near(other, 7), 60)]
    )
    assert [(m.hash, m.distance) for m in found] == [(PDQ, 2), (other, 7)]


def test_match_combines_and_carries_allow_pdq():
    data = b"bytes"
    banks = BankSet(
        [
            new_bank(spec("allow", "pdq", action="safe", allow_pdq=True), [PDQ]),
            new_bank(spec("md5s", "md5"), [hashlib.md5(data).hexdigest()]),
        ]
    )
    found = banks.match(hashlib.md5(data).hexdigest(), hashlib.sha256(data).hexdigest(), [(PDQ, 100)])
    assert [(m.bank, m.action, m.allow_pdq) for m in found] == [
        ("md5s", "unsafe", False),
        ("allow", "safe", True),
    ]


def test_a_malformed_query_hash_is_a_value_error_not_a_crash():
    banks = BankSet([new_bank(spec("b", "pdq"), [PDQ])])
    with pytest.raises(ValueError, match="not a pdq hash"):
        banks.match_pdq([("abc", 90)])


def test_bank_updates_in_place():
    bank = new_bank(spec("b", "pdq"))
    assert isinstance(bank, PdqBank) and len(bank) == 0
    assert bank.add([PDQ, PDQ]) == 1 and PDQ in bank
    assert bank.remove([PDQ]) == 1 and PDQ not in bank
    exact = new_bank(spec("m", "md5"), ["0" * 32])
    assert isinstance(exact, ExactBank)
    assert exact.add(["0" * 32, "1" * 32]) == 1 and exact.remove(["0" * 32, "2" * 32]) == 1
    assert len(exact) == 1


def test_from_files(tmp_path):
    (tmp_path / "p.txt").write_text(f"# known\n{PDQ},note\n")
    (tmp_path / "m.csv").write_text("hash,note\n" + "a" * 32 + ",x\n")
    banks = BankSet.from_files(
        [(spec("p", "pdq"), tmp_path / "p.txt"), (spec("m", "md5"), tmp_path / "m.csv")]
    )
    assert banks.names() == ["m", "p"]
    assert [m.bank for m in banks.match("a" * 32, None, [(PDQ, 99)])] == ["m", "p"]
    (tmp_path / "bad.txt").write_text(f"{PDQ}\n{PDQ[:-2]}\n")
    with pytest.raises(BankFormatError, match=r"bad\.txt:2: not a pdq hash"):
        BankSet.from_files([(spec("b", "pdq"), tmp_path / "bad.txt")])
    with pytest.raises(BankFormatError, match="bank names repeat"):
        BankSet.from_files([(spec("p", "pdq"), tmp_path / "p.txt"), (spec("p", "pdq"), tmp_path / "p.txt")])


def test_entries_from_command_line_hashes():
    assert entries_from_hashes("pdq", [PDQ.upper()], "n", 80) == [BankEntry(PDQ, "n", 80)]
    with pytest.raises(BankFormatError, match="quality 10 is below 50"):
        entries_from_hashes("pdq", [PDQ], quality=10)
    with pytest.raises(BankFormatError, match="not a md5 hash"):
        entries_from_hashes("md5", [PDQ])
