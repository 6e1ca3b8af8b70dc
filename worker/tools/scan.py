"""``modgate scan``: run the pipeline in-process over files, directories and S3 prefixes,
without Redis, writing one JSON verdict per line and returning a summary."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

from modgate.settings import Settings
from modgate.verdict import Source, Verdict
from worker.ingest.fetch import Fetcher
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
