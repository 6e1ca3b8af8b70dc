"""``modgate eval``: labelled images → verdicts (stored ones, or a scan through
``worker.tools.scan`` like ``modgate scan``) → metrics under a policy → report files."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from modgate.policy import Policy
from modgate.verdict import Source, Verdict
from worker.quality.labels import LabelSet, join
from worker.quality.metrics import evaluate
from worker.quality.report import write_report


def label_sources(labels: LabelSet) -> list[Source]:
    """One exact source per labelled uri (an S3 uri is one key, not a prefix)."""
    sources = []
    for row in labels.rows:
        if row.key.startswith("s3://"):
            bucket, _, key = row.key[len("s3://") :].partition("/")
            sources.append(Source(kind="s3", uri=row.key, bucket=bucket, key=key))
        else:
            sources.append(Source(kind="file", uri=row.key, path=row.key))
    return sources


def scan_labelled(
    pipeline: Any, labels: LabelSet, output: Path, on_verdict: Callable[[Verdict], None] | None = None
) -> Path:
    """Moderate every labelled image with ``modgate scan``'s code; verdicts go to ``output``
    (JSONL), so later runs can pass it as ``--verdicts`` and skip the models."""
    from worker.tools.scan import run_scan

    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w") as handle:
        run_scan(pipeline, label_sources(labels), handle, on_verdict=on_verdict)
    return output


def run_eval(
    labels: LabelSet,
    verdicts: Sequence[Verdict],
    policy: Policy,
    out: Path,
    review_as: str = "unsafe",
    resamples: int = 1000,
    seed: int = 0,
    plots: bool = True,
) -> dict[str, Any]:
    """Join, measure, write ``out/report.json``, PNGs and ``out/report.html``; return the report."""
    joined = join(labels, verdicts)
    evaluation = evaluate(joined, policy, review_as=review_as, resamples=resamples, seed=seed)
    report = evaluation.report
    report["labels"] = {"rows": len(labels.rows), "style": labels.style}
    report["errors"] = dict(sorted(joined.error_codes.items()))
    report["unmatched"] = {
        "labels_without_verdict": joined.labels_without_verdict.as_dict(),
        "verdicts_without_label": joined.verdicts_without_label.as_dict(),
        "duplicate_uris": labels.duplicate_uris.as_dict(),
        "duplicate_verdicts": joined.duplicate_verdicts.as_dict(),
        "unknown_categories": labels.unknown_categories.as_dict(),
        "unsafe_without_category": labels.unsafe_without_category.as_dict(),
        "safe_with_category": labels.safe_with_category.as_dict(),
    }
    write_report(out, evaluation, plots=plots)
    return report
