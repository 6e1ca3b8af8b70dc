"""Labels files (CSV or JSONL, UnsafeBench or multi-label style) and joining them to verdicts.

UnsafeBench style: ``uri``, ``label`` (safe/unsafe), ``category`` (empty for safe), optional
``split``; an image labelled with one category is a negative for every other one.
A ``safe`` row with a category contradicts itself: the row counts as safe (``label``
decides, as in UnsafeBench, whose safe images carry the topic they were collected under)
and is counted and listed in ``safe_with_category``.
Multi-label style: ``uri`` plus one 0/1 column per category (any subset of the 11), optional
``split``; categories without a column are unknown, not negative.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modgate.policy import CATEGORIES
from modgate.verdict import Verdict

EXAMPLES = 5  # how many offending uris/names a report lists
_RESERVED = {"uri", "split", "label", "category"}
_TRUE = {"1", "true", "yes"}
_FALSE = {"0", "false", "no"}
# UnsafeBench's own spelling of its categories.
_ALIASES = {"public_and_personal_health": "public_health", "selfharm": "self_harm"}


class LabelsError(ValueError):
    """A labels or verdicts file that cannot be read: the message names file and line."""


def _category_name(raw: str) -> str:
    name = raw.strip().lower().replace("-", "_").replace(" ", "_")
    return _ALIASES.get(name, name)


@dataclass(frozen=True)
class LabelRow:
    uri: str
    key: str  # what a verdict's source must resolve to
    unsafe: bool
    truth: dict[str, int]  # known per-category labels; a category not here is unknown
    split: str | None
    line: int


@dataclass
class Issue:
    """Something reported, never silently dropped: how many, and the first few."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, example: str, n: int = 1) -> None:
        self.count += n
        if len(self.examples) < EXAMPLES and example not in self.examples:
            self.examples.append(example)

    def as_dict(self) -> dict[str, Any]:
        return {"count": self.count, "examples": self.examples}


@dataclass
class LabelSet:
    rows: list[LabelRow]
    style: str  # "unsafebench" | "multilabel"
    unknown_categories: Issue = field(default_factory=Issue)
    duplicate_uris: Issue = field(default_factory=Issue)
    unsafe_without_category: Issue = field(default_factory=Issue)
    safe_with_category: Issue = field(default_factory=Issue)


def label_key(uri: str, base: Path) -> str:
    """s3 URIs as written; local paths resolved against the labels file's directory."""
    if uri.startswith("s3://"):
        return uri
    return os.path.realpath(base / uri)


def verdict_key(verdict: Verdict) -> str:
    source = verdict.source
    if source.kind == "s3" and source.bucket and source.key is not None:
        return f"s3://{source.bucket}/{source.key}"
    if source.kind == "file" and source.path:
        return os.path.realpath(source.path)
    return source.uri


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) from a CSV (header row) or JSONL file."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelsError(f"{path}: cannot read labels: {exc}") from None
    if not text.strip():
        raise LabelsError(f"{path}: the labels file is empty")
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson", ".json") or text.lstrip().startswith("{")
    if jsonl:
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LabelsError(
                    f"{path}:{number}: not a JSON object ({exc.msg}); truncated line?"
                ) from None
            if not isinstance(record, dict):
                raise LabelsError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            yield number, {str(k).strip().lower(): v for k, v in record.items()}
        return
    reader = csv.reader(io.StringIO(text, newline=""))  # quoted fields may span lines
    try:
        header = [h.strip().lower() for h in next(reader)]
    except (StopIteration, csv.Error) as exc:
        raise LabelsError(f"{path}:1: cannot read the CSV header: {exc}") from None
    try:
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise LabelsError(
                    f"{path}:{reader.line_num}: {len(row)} fields, the header has {len(header)}"
                )
            yield reader.line_num, dict(zip(header, row, strict=True))
    except csv.Error as exc:
        raise LabelsError(f"{path}:{reader.line_num}: malformed CSV: {exc}") from None


def _flag(value: Any, where: str, column: str) -> int:
    text = str(value).strip().lower() if not isinstance(value, bool) else str(value).lower()
    if text in _TRUE:
        return 1
    if text in _FALSE:
        return 0
    raise LabelsError(f"{where}: column {column!r} must be 0 or 1, got {value!r}")


def read_labels(path: Path) -> LabelSet:
    """Parse a labels file; raises LabelsError (with the line) on anything malformed."""
    path = Path(path)
    base = path.resolve().parent
    rows: list[LabelRow] = []
    seen: set[str] = set()
    out: LabelSet | None = None
    columns: Sequence[str] = ()
    for number, record in _records(path):
        where = f"{path}:{number}"
        if out is None:
            columns = list(record)
            if "uri" not in record:
                raise LabelsError(f"{where}: missing column `uri` (have: {', '.join(columns) or 'none'})")
            if "label" in record and "category" not in record:
                raise LabelsError(
                    f"{where}: missing column `category` (UnsafeBench style: uri,label,category)"
                )
            style = "unsafebench" if "label" in record else "multilabel"
            out = LabelSet(rows=rows, style=style)
            if style == "multilabel":
                extra = [c for c in columns if c not in _RESERVED]
                if not extra:
                    raise LabelsError(
                        f"{where}: no label columns: give `label`,`category` or one 0/1 column per category"
                    )
                for column in extra:
                    if _category_name(column) not in CATEGORIES:
                        out.unknown_categories.add(column, 0)
        uri = str(record.get("uri") or "").strip()
        if not uri:
            raise LabelsError(f"{where}: empty `uri`")
        split_value = record.get("split")
        split = str(split_value).strip() if split_value not in (None, "") else None
        truth: dict[str, int] = {}
        contradictory = False
        if out.style == "unsafebench":
            if "label" not in record:
                raise LabelsError(f"{where}: missing `label`")
            label = str(record["label"]).strip().lower()
            if label in ("safe", "0", "false"):
                unsafe = False
            elif label in ("unsafe", "1", "true"):
                unsafe = True
            else:
                raise LabelsError(f"{where}: `label` must be safe or unsafe, got {record['label']!r}")
            raw = str(record.get("category") or "").strip()
            category = _category_name(raw) if raw else ""
            if not unsafe:
                truth = dict.fromkeys(CATEGORIES, 0)
                contradictory = bool(raw)
            elif category in CATEGORIES:
                truth = {c: int(c == category) for c in CATEGORIES}
            elif category:
                out.unknown_categories.add(raw)  # unsafe overall, unknown per category
            else:
                out.unsafe_without_category.add(uri)
        else:
            for column, value in record.items():
                if column in _RESERVED:
                    continue
                name = _category_name(column)
                if name in CATEGORIES:
                    truth[name] = _flag(value, where, column)
                elif column not in columns:
                    out.unknown_categories.add(column)
                else:
                    out.unknown_categories.count += 1
            unsafe = any(truth.values())
        key = label_key(uri, base)
        if key in seen:
            out.duplicate_uris.add(uri)  # the first row for a uri wins
            continue
        seen.add(key)
        if contradictory:
            out.safe_with_category.add(uri)
        rows.append(LabelRow(uri=uri, key=key, unsafe=unsafe, truth=truth, split=split, line=number))
    if out is None or not rows:
        raise LabelsError(f"{path}: no labelled rows")
    return out


@dataclass
class Joined:
    """Labelled images with an ok verdict, aligned; and what could not be used."""

    rows: list[LabelRow]
    verdicts: list[Verdict]
    error_codes: Counter[str]
    labels_without_verdict: Issue
    verdicts_without_label: Issue
    duplicate_verdicts: Issue

    def truth(self, category: str) -> np.ndarray:
        """1/0 per image, NaN where the label says nothing about ``category``."""
        return np.array([r.truth.get(category, np.nan) for r in self.rows], dtype=np.float64)

    @property
    def unsafe(self) -> np.ndarray:
        return np.array([r.unsafe for r in self.rows], dtype=bool)

    @property
    def splits(self) -> list[str | None]:
        return [r.split for r in self.rows]


def join(labels: LabelSet, verdicts: Sequence[Verdict]) -> Joined:
    """Match labels to verdicts by uri. Error verdicts are counted per code and left out
    of the metrics (an error is not a prediction); a later verdict for a uri replaces an
    earlier one (a re-scan) and is counted."""
    by_key: dict[str, Verdict] = {}
    duplicate_verdicts = Issue()
    for verdict in verdicts:
        key = verdict_key(verdict)
        if key in by_key:
            duplicate_verdicts.add(verdict.source.uri)
        by_key[key] = verdict
    wanted = {row.key for row in labels.rows}
    without_label = Issue()
    for key, verdict in by_key.items():
        if key not in wanted:
            without_label.add(verdict.source.uri)
    rows: list[LabelRow] = []
    matched: list[Verdict] = []
    errors: Counter[str] = Counter()
    without_verdict = Issue()
    for row in labels.rows:
        verdict = by_key.get(row.key)
        if verdict is None:
            without_verdict.add(row.uri)
        elif verdict.status != "ok":
            errors[verdict.error.code.value if verdict.error else "unknown"] += 1
        else:
            rows.append(row)
            matched.append(verdict)
    return Joined(rows, matched, errors, without_verdict, without_label, duplicate_verdicts)
