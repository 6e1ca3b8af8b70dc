"""Bank files and specs (modgate/banks.py): the formats read, every malformed input refused
with its file and line, and PDQ's quality rule."""

from __future__ import annotations

import contextlib
import io

import pytest
from pydantic import ValidationError

from modgate.banks import (
    BankEntry,
    BankFormatError,
    BankSpec,
    format_bank,
    normalize_hash,
    parse_bank_file,
    parse_bank_text,
)

PDQ_A = "a" * 64
PDQ_B = "0123456789abcdef" * 4
MD5 = "d41d8cd98f00b204e9800998ecf8427e"
SHA = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_normalize_hash_lowercases_and_strips():
    assert normalize_hash("pdq", "  " + PDQ_B.upper() + "\n") == PDQ_B
    assert normalize_hash("md5", MD5.upper()) == MD5
    assert normalize_hash("sha256", SHA) == SHA


@pytest.mark.parametrize(
    ("kind", "text", "message"),
    [
        ("pdq", "a" * 63, "63 hex digits, expected 64"),
        ("pdq", "a" * 65, "65 hex digits, expected 64"),
        ("md5", SHA, "64 hex digits, expected 32"),
        ("pdq", "g" * 64, "not hexadecimal"),
        ("pdq", "0x" + "a" * 62, "not hexadecimal"),
        ("md5", "", "empty md5 hash"),
        ("sha1", "a" * 40, "unknown hash kind"),
    ],
)
def test_normalize_hash_refuses_malformed(kind, text, message):
    with pytest.raises(BankFormatError, match=message):
        normalize_hash(kind, text)


def test_a_long_input_is_not_echoed_whole():
    with pytest.raises(BankFormatError) as err:
        normalize_hash("pdq", "z" * 10_000)
    assert len(str(err.value)) < 200


def test_spec_defaults_follow_the_kind():
    pdq = BankSpec(name="known-csam", kind="pdq")
    assert (pdq.max_distance, pdq.action, pdq.category, pdq.allow_pdq) == (
        31,
        "unsafe",
        "illegal_activity",
        False,
    )
    assert BankSpec(name="m", kind="md5").max_distance == 0
    assert BankSpec(name="m", kind="sha256", max_distance=0).max_distance == 0
    assert BankSpec(name="p", kind="pdq", max_distance=10).max_distance == 10


@pytest.mark.parametrize(
    "fields",
    [
        {"name": "m", "kind": "md5", "max_distance": 3},  # exact kinds match exactly
        {"name": "p", "kind": "pdq", "max_distance": 32},  # beyond what the index searches
        {"name": "p", "kind": "pdq", "max_distance": -1},
        {"name": "bad:name", "kind": "pdq"},  # a colon would split its Redis keys
        {"name": "", "kind": "pdq"},
        {"name": "p", "kind": "pdq", "category": "not_a_category"},
        {"name": "p", "kind": "pdq", "action": "block"},
        {"name": "p", "kind": "phash"},
        {"name": "p", "kind": "pdq", "extra": 1},
    ],
)
def test_spec_refuses(fields):
    with pytest.raises(ValidationError):
        BankSpec.model_validate(fields)


def test_plain_text_with_comments_and_notes():
    text = f"""# exported 2024-01-01
{PDQ_A}
{PDQ_B.upper()},takedown 123

  {"b" * 64} a note with spaces, and commas
# {"c" * 64} commented out
{PDQ_A},a repeat keeps the first
"""
    entries = parse_bank_text(text, "pdq", "list.txt")
    assert entries == [
        BankEntry(PDQ_A),
        BankEntry(PDQ_B, "takedown 123"),
        BankEntry("b" * 64, "a note with spaces, and commas"),
    ]


def test_csv_with_header_note_and_quality():
    text = f"hash,note,quality\n{PDQ_A},first,90\n{PDQ_B},,\n"
    assert parse_bank_text(text, "pdq") == [BankEntry(PDQ_A, "first", 90), BankEntry(PDQ_B, "", None)]
    # Columns in another order, an unknown column ignored, quoted notes with commas.
    text = f'quality,id,HASH,note\n77,1,{PDQ_A},"a, b"\n'
    assert parse_bank_text(text, "pdq") == [BankEntry(PDQ_A, "a, b", 77)]
    assert parse_bank_text(f"hash\n{MD5}\n", "md5") == [BankEntry(MD5)]


def test_pdq_quality_below_50_is_refused_with_its_line():
    text = f"hash,quality\n{PDQ_A},50\n{PDQ_B},49\n"
    with pytest.raises(BankFormatError, match=r"^q\.csv:3: PDQ quality 49 is below 50"):
        parse_bank_text(text, "pdq", "q.csv")
    with pytest.raises(BankFormatError, match=r"q\.csv:2: quality is not an integer"):
        parse_bank_text(f"hash,quality\n{PDQ_A},high\n", "pdq", "q.csv")
    with pytest.raises(BankFormatError, match=r"q\.csv:2: PDQ quality must be 0\.\.100"):
        parse_bank_text(f"hash,quality\n{PDQ_A},101\n", "pdq", "q.csv")


def test_threatexchange_csv_as_threatexchange_writes_it():
    """``threatexchange dataset -P --csv``: the command's own writer, not a copy of it."""
    from threatexchange.cli.dataset_cmd import DatasetCommand
    from threatexchange.exchanges.fetch_state import FetchedSignalMetadata
    from threatexchange.signal_type.md5 import VideoMD5Signal
    from threatexchange.signal_type.pdq.signal import PdqSignal

    cmd = object.__new__(DatasetCommand)
    cmd.csv, cmd.print_signals_only = True, False
    signals = {
        PdqSignal: {
            PDQ_A: [("Sample Data", FetchedSignalMetadata())],
            PDQ_B: [("Other", FetchedSignalMetadata())],
        },
        VideoMD5Signal: {MD5: [("Sample Data", FetchedSignalMetadata())]},
    }
    cmd.get_signal_types = lambda settings: set(signals)
    cmd.get_signals = lambda settings, types: signals
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cmd.execute_print_signals(None)
    text = out.getvalue()
    assert text.startswith("signal_type,signal_str,collab,category,tags")

    pdq = parse_bank_text(text, "pdq", "te.csv")
    assert [e.hash for e in pdq] == [PDQ_A, PDQ_B]
    assert pdq[0].note.startswith("Sample Data ")  # collab, then category (and tags)
    assert [e.hash for e in parse_bank_text(text, "md5", "te.csv")] == [MD5]
    with pytest.raises(BankFormatError, match=r"te\.csv: no sha256 hashes"):
        parse_bank_text(text, "sha256", "te.csv")


def test_threatexchange_row_with_a_bad_hash_names_its_line():
    text = f"signal_type,signal_str,collab,category,tags\npdq,{PDQ_A},c,x,\npdq,{PDQ_A[:-1]},c,x,\n"
    with pytest.raises(BankFormatError, match=r"te\.csv:3: not a pdq hash: 63 hex digits"):
        parse_bank_text(text, "pdq", "te.csv")


def test_threatexchange_state_file_reads_as_plain_text():
    # simple.pdq.te: the indicator, then its descriptor rollup (first id, added on, labels).
    text = f'{PDQ_A},12345,2021-01-01,"tag1 tag2"\n'
    assert parse_bank_text(text, "pdq") == [BankEntry(PDQ_A, '12345,2021-01-01,"tag1 tag2"')]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (f"{PDQ_A}\n{'a' * 63}\n", r"bank\.txt:2: not a pdq hash: 63 hex digits, expected 64"),
        (f"{PDQ_A}\n\n# c\nnothex!{'a' * 57}\n", r"bank\.txt:4: not a pdq hash \(not hexadecimal\)"),
        (f"hash,note\n{PDQ_A},x\n{'a' * 66},y\n", r"bank\.txt:3: not a pdq hash: 66 hex digits"),
        ("", r"bank\.txt: no hashes \(the file is empty\)"),
        ("# only a comment\n\n", r"bank\.txt: no hashes"),
        ("hash,note\n", r"bank\.txt: no pdq hashes"),
        (f"{PDQ_A},{'x' * 1001}\n", r"bank\.txt:1: note longer than 1000"),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "bank.txt"
    path.write_text(content)
    with pytest.raises(BankFormatError, match=message):
        parse_bank_file(path, "pdq")


def test_unreadable_files(tmp_path):
    with pytest.raises(BankFormatError, match="cannot read"):
        parse_bank_file(tmp_path / "missing.txt", "pdq")
    path = tmp_path / "latin1.txt"
    path.write_bytes(f"{PDQ_A}\n{PDQ_B},caf\xe9\n".encode("latin-1"))
    with pytest.raises(BankFormatError, match=r"latin1\.txt:2: not UTF-8"):
        parse_bank_file(path, "pdq")


def test_bom_and_crlf_are_read(tmp_path):
    path = tmp_path / "win.csv"
    path.write_bytes(("\ufeffhash,note\r\n" + PDQ_A + ",x\r\n").encode())
    assert parse_bank_file(path, "pdq") == [BankEntry(PDQ_A, "x")]


def test_format_bank_round_trips(tmp_path):
    entries = [BankEntry(PDQ_B, 'a "quoted", note', 80), BankEntry(PDQ_A), BankEntry("b" * 64, "n")]
    text = format_bank(entries)
    assert text.splitlines()[0] == "hash,note,quality"
    path = tmp_path / "out.csv"
    path.write_text(text)
    assert parse_bank_file(path, "pdq") == sorted(entries, key=lambda e: e.hash)
