"""Hash banks as files and specs: what a bank is, how its hashes are written, how bank files
are read. Light (pydantic + stdlib) so producers and a console can use it; matching lives
in ``worker/judge/banks.py``, the Redis copy in the same place and in ``modgate banks``.

A bank is a named list of hashes of one kind with what a match means. Files:

- plain text: one hex hash per line, optionally followed by a note after a comma or
  whitespace; blank lines and lines starting with ``#`` are skipped;
- CSV with a header whose columns include ``hash`` (and optionally ``note``, ``quality``:
  the PDQ quality, 0-100); other columns are ignored;
- ThreatExchange's CSV, as ``threatexchange dataset -P --csv`` writes it
  (``signal_type,signal_str,collab,category,tags``): the rows of this bank's kind are read
  (``pdq``; ``md5``/``video_md5``; ``sha256``/``video_sha256``), the others skipped; the
  note is ``collab category tags``. ThreatExchange's own state files
  (``simple.pdq.te``: hash, then descriptor fields) read as plain text.

Every problem is a :class:`BankFormatError` naming the file and line. PDQ hashes whose
quality is known and below 50 are refused, as ThreatExchange refuses to produce them: flat
images (a blank frame, a solid colour) hash alike and would match each other.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from modgate.detector_scores import Category

BankKind = Literal["pdq", "md5", "sha256"]
BankAction = Literal["unsafe", "review", "safe"]
KINDS: tuple[str, ...] = ("pdq", "md5", "sha256")
HEX_DIGITS = {"pdq": 64, "md5": 32, "sha256": 64}
# Meta's recommended PDQ match threshold, and the most the bank index searches exactly.
PDQ_MAX_DISTANCE = 31
# ThreatExchange's PdqSignal.QUALITY_THRESHOLD: below it, hashes are neither imported nor matched.
PDQ_MIN_QUALITY = 50
MAX_NOTE_CHARS = 1000
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# ThreatExchange signal type names per bank kind (video_* hashes are MD5/SHA-256 of bytes too).
TE_SIGNAL_TYPES = {
    "pdq": ("pdq",),
    "md5": ("md5", "video_md5", "photo_md5"),
    "sha256": ("sha256", "video_sha256", "photo_sha256"),
}
_HEX = re.compile(r"^[0-9a-f]+$")


class BankFormatError(ValueError):
    """A bank file, a hash or a stored bank that cannot be used; the message names where."""


class BankSpec(BaseModel):
    """A bank's name and what a match in it means."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    kind: BankKind
    category: Category = "illegal_activity"
    action: BankAction = "unsafe"
    # PDQ: a match is a hash within this many bits (default 31); exact kinds: always 0.
    max_distance: int | None = Field(None, ge=0, le=PDQ_MAX_DISTANCE)
    # A PDQ match of a `safe` bank allow-lists only with this set: crafted PDQ collisions
    # are published, and a near match must not let an image through.
    allow_pdq: bool = False

    @model_validator(mode="after")
    def _distance_fits_kind(self) -> BankSpec:
        if self.kind == "pdq":
            if self.max_distance is None:
                self.max_distance = PDQ_MAX_DISTANCE
        elif self.max_distance not in (None, 0):
            raise ValueError(f"max_distance applies to PDQ banks only ({self.kind} banks match exactly)")
        else:
            self.max_distance = 0
        return self


@dataclass(frozen=True, slots=True)
class BankEntry:
    hash: str
    note: str = ""
    quality: int | None = None


def normalize_hash(kind: str, text: str) -> str:
    """``text`` as a bank stores a hash of ``kind``: lowercase hex of the right length.

    Raises :class:`BankFormatError` (a ValueError) saying what is wrong, never echoing more
    than the first characters of what it was given."""
    if kind not in HEX_DIGITS:
        raise BankFormatError(f"unknown hash kind {kind!r} (known: {', '.join(KINDS)})")
    value = text.strip().lower()
    shown = value if len(value) <= 72 else value[:69] + "..."
    want = HEX_DIGITS[kind]
    if not value:
        raise BankFormatError(f"empty {kind} hash")
    if not _HEX.match(value):
        raise BankFormatError(f"not a {kind} hash (not hexadecimal): {shown!r}")
    if len(value) != want:
        raise BankFormatError(f"not a {kind} hash: {len(value)} hex digits, expected {want}: {shown!r}")
    return value


def check_quality(kind: str, quality: int | None) -> None:
    """Refuse a PDQ hash whose quality is known to be too low to match on."""
    if quality is None:
        return
    if not 0 <= quality <= 100:
        raise BankFormatError(f"PDQ quality must be 0..100, not {quality}")
    if kind == "pdq" and quality < PDQ_MIN_QUALITY:
        raise BankFormatError(
            f"PDQ quality {quality} is below {PDQ_MIN_QUALITY}: such hashes (flat images) collide, "
            "and are neither imported nor matched"
        )


def check_note(note: str) -> str:
    note = note.strip()
    if len(note) > MAX_NOTE_CHARS:
        raise BankFormatError(f"note longer than {MAX_NOTE_CHARS} characters")
    if any(ord(c) < 32 and c != "\t" for c in note):
        raise BankFormatError("note contains control characters")
    return note


def entries_from_hashes(
    kind: str, hashes: Iterable[str], note: str = "", quality: int | None = None
) -> list[BankEntry]:
    """Hashes given one by one (command line, API) as entries (BankFormatError on the first malformed one)."""
    check_quality(kind, quality)
    note = check_note(note)
    return [BankEntry(normalize_hash(kind, h), note, quality) for h in hashes]


def _entry(kind: str, hash_text: str, note: str, quality_text: str | None) -> BankEntry:
    quality: int | None = None
    if quality_text is not None and quality_text.strip():
        try:
            quality = int(quality_text.strip())
        except ValueError:
            raise BankFormatError(f"quality is not an integer: {quality_text.strip()[:20]!r}") from None
    check_quality(kind, quality)
    return BankEntry(normalize_hash(kind, hash_text), check_note(note), quality)


def parse_bank_text(text: str, kind: str, source: str = "<input>") -> list[BankEntry]:
    """Entries of a bank file's text (any of the formats above); repeats keep the first."""
    if kind not in HEX_DIGITS:
        raise BankFormatError(f"{source}: unknown hash kind {kind!r} (known: {', '.join(KINDS)})")
    lines = text.splitlines()
    first = next(
        (i for i, line in enumerate(lines) if line.strip() and not line.lstrip().startswith("#")), None
    )
    if first is None:
        raise BankFormatError(f"{source}: no hashes (the file is empty)")
    header = [c.strip().lower() for c in next(csv.reader([lines[first]]))]
    if "signal_type" in header and "signal_str" in header:
        entries = _parse_threatexchange(lines, first, header, kind, source)
    elif "hash" in header:
        entries = _parse_csv(lines, first, header, kind, source)
    else:
        entries = _parse_plain(lines, kind, source)
    if not entries:
        raise BankFormatError(f"{source}: no {kind} hashes")
    seen: set[str] = set()
    unique = []
    for entry in entries:
        if entry.hash not in seen:
            seen.add(entry.hash)
            unique.append(entry)
    return unique


def parse_bank_file(path: str | Path, kind: str) -> list[BankEntry]:
    """Entries of a bank file; :class:`BankFormatError` names ``path:line`` on any problem."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BankFormatError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise BankFormatError(f"{path}:{line}: not UTF-8 text") from None
    return parse_bank_text(text, kind, str(path))


def _located(source: str, number: int, exc: BankFormatError) -> BankFormatError:
    return BankFormatError(f"{source}:{number}: {exc}")


def _parse_plain(lines: list[str], kind: str, source: str) -> list[BankEntry]:
    out = []
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        hash_text, note = _split_note(stripped)
        try:
            out.append(_entry(kind, hash_text, note, None))
        except BankFormatError as exc:
            raise _located(source, number, exc) from None
    return out


def _split_note(line: str) -> tuple[str, str]:
    """``hash,note`` or ``hash note``: the hash ends at the first comma or whitespace."""
    match = re.match(r"^([^,\s]*)[,\s]?(.*)$", line)
    assert match is not None  # the pattern matches any line
    return match.group(1), match.group(2)


def _rows(lines: list[str], first: int) -> Iterable[tuple[int, list[str]]]:
    # One csv reader over the text from the header on, so quoted fields may span lines;
    # line numbers come from the reader.
    reader = csv.reader(io.StringIO("\n".join(lines[first + 1 :])))
    for row in reader:
        if not row or not any(c.strip() for c in row) or row[0].lstrip().startswith("#"):
            continue
        yield first + 1 + reader.line_num, row


def _parse_csv(lines: list[str], first: int, header: list[str], kind: str, source: str) -> list[BankEntry]:
    col = {name: header.index(name) for name in ("hash", "note", "quality") if name in header}
    out = []
    for number, row in _rows(lines, first):
        try:
            if len(row) <= col["hash"]:
                raise BankFormatError(f"no {header[col['hash']]!r} column in this row")
            note = row[col["note"]] if "note" in col and len(row) > col["note"] else ""
            quality = row[col["quality"]] if "quality" in col and len(row) > col["quality"] else None
            out.append(_entry(kind, row[col["hash"]], note, quality))
        except BankFormatError as exc:
            raise _located(source, number, exc) from None
    return out


def _parse_threatexchange(
    lines: list[str], first: int, header: list[str], kind: str, source: str
) -> list[BankEntry]:
    types = TE_SIGNAL_TYPES[kind]
    col_type, col_str = header.index("signal_type"), header.index("signal_str")
    extra = [header.index(c) for c in ("collab", "category", "tags") if c in header]
    out = []
    for number, row in _rows(lines, first):
        if len(row) <= max(col_type, col_str):
            raise BankFormatError(f"{source}:{number}: expected {len(header)} columns, got {len(row)}")
        if row[col_type].strip().lower() not in types:
            continue  # a dataset export mixes signal types; this bank takes its own
        note = " ".join(row[i].strip() for i in extra if i < len(row) and row[i].strip())
        try:
            out.append(_entry(kind, row[col_str], note, None))
        except BankFormatError as exc:
            raise _located(source, number, exc) from None
    return out


def format_bank(entries: Iterable[BankEntry]) -> str:
    """A bank as CSV (``hash,note,quality``, sorted by hash): what ``modgate banks export``
    writes and ``parse_bank_file`` reads back."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["hash", "note", "quality"])
    for entry in sorted(entries, key=lambda e: e.hash):
        writer.writerow([entry.hash, entry.note, "" if entry.quality is None else entry.quality])
    return out.getvalue()
