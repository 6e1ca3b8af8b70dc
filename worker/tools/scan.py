"""``modgate scan``: run the pipeline in-process over files, directories and S3 prefixes,
without Redis, writing one JSON verdict per line and returning a summary."""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from modgate.banks import BankFormatError, BankSpec
from modgate.settings import Settings
from modgate.verdict import Source, Verdict
from worker.ingest.fetch import Fetcher
from worker.judge.banks import BankSet
from worker.judge.score_cache import MemoryScoreCache
from worker.pipeline import Pipeline


@dataclass
class ScanSummary:
    images: int = 0
    decisions: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    skipped_detectors: dict[str, str] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def add(self, verdict: Verdict) -> None:
        self.images += 1
        if verdict.status == "ok" and verdict.decision is not None:
            self.decisions[verdict.decision] += 1
        elif verdict.error is not None:
            self.errors[verdict.error.code.value] += 1


def expand_targets(fetcher: Fetcher, targets: Iterable[str | Source]) -> Iterator[Source]:
    """Targets are expanded (directories walked, S3 prefixes listed); a ``Source`` is one
    exact image (``modgate eval`` scans the labelled uris, not everything beside them)."""
    for target in targets:
        if isinstance(target, Source):
            yield target
        else:
            yield from fetcher.expand(target)


def run_scan(
    pipeline: Pipeline,
    targets: Iterable[str | Source],
    output: TextIO,
    on_verdict: Callable[[Verdict], None] | None = None,
) -> ScanSummary:
    summary = ScanSummary(skipped_detectors=dict(pipeline.detectors.skipped))
    start = time.perf_counter()
    for verdict in pipeline.moderate(expand_targets(pipeline.fetcher, targets)):
        output.write(verdict.model_dump_json() + "\n")
        summary.add(verdict)
        if on_verdict is not None:
            on_verdict(verdict)
    output.flush()
    summary.seconds = time.perf_counter() - start
    return summary


def scan_pipeline(settings: Settings, banks: Any = None) -> Pipeline:
    """The pipeline of an offline run (``scan``, ``eval``): an in-memory score cache, so a
    file met twice is scored once, and the banks given on the command line, if any."""
    cache = MemoryScoreCache(settings.cache) if settings.cache.enabled else None
    return Pipeline(settings, cache=cache, banks=(lambda: banks) if banks is not None else None)


_HEX = re.compile(r"[0-9a-fA-F]+")


def _sniff_kind(path: Path) -> str:
    """A bank file's kind from its first hash: 32 hex digits MD5, 64 PDQ (hash lists of
    64 hex digits are PDQ far more often; say ``:sha256`` for SHA-256)."""
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            for field in re.split(r"[,\s]+", line.strip()):
                if _HEX.fullmatch(field) and len(field) in (32, 64):
                    return "md5" if len(field) == 32 else "pdq"
    raise BankFormatError(f"{path}: no MD5 or PDQ hash found to tell the bank's kind; add :KIND")


def parse_bank_option(text: str) -> tuple[BankSpec, Path]:
    """``NAME=FILE[:ACTION[:CATEGORY[:KIND]]]`` (``modgate scan --bank``): action default
    ``unsafe``, category ``illegal_activity``, kind from the file's hashes. ValueError
    (BankFormatError or a pydantic error) names what is wrong."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise BankFormatError(f"--bank {text!r}: expected NAME=FILE[:ACTION[:CATEGORY[:KIND]]]")
    file, *fields = rest.split(":")
    if len(fields) > 3:
        raise BankFormatError(f"--bank {text!r}: expected NAME=FILE[:ACTION[:CATEGORY[:KIND]]]")
    action, category, kind = ([*fields, "", "", ""])[:3]
    path = Path(file)
    if not path.is_file():
        raise BankFormatError(f"--bank {text!r}: {file} is not a file")
    spec = BankSpec(
        name=name,
        kind=kind or _sniff_kind(path),
        action=action or "unsafe",
        category=category or "illegal_activity",
    )
    return spec, path


def scan_banks(options: Iterable[str]) -> BankSet | None:
    """The banks of a ``modgate scan`` run, from ``--bank`` options (None without any)."""
    specs = [parse_bank_option(o) for o in options]
    return BankSet.from_files(specs) if specs else None
