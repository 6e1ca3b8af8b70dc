"""What ``modgate eval`` leaves behind: ``report.json``, one PNG per category (precision–
recall and ROC of the fused score beside each detector score, and the score histogram
safe vs unsafe with the threshold and review band), and ``report.html`` embedding them
all (no network needed to view it): the notes (labelled categories no detector covers),
the tables, a confusion matrix per category (at the threshold, and with the review band)
and per split, and the input issues."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from worker.quality.metrics import Evaluation


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, float) for v in value):
        return f"[{value[0]:.3f}, {value[1]:.3f}]"
    return str(value)


def _thin(x: np.ndarray, y: np.ndarray, points: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """At most ``points`` of a curve: 10,000 vertices per line draw slowly and look the same."""
    if len(x) <= points:
        return x, y
    keep = np.unique(np.linspace(0, len(x) - 1, points).astype(int))
    return x[keep], y[keep]


def category_figure(name: str, arrays: Any) -> Any:
    """PR and ROC curves (fused score and each detector score, each chart with its legend)
    and the score histogram, as a matplotlib Figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.metrics import precision_recall_curve, roc_curve

    # A bare Figure (no pyplot): no global state, no display, no layout solver.
    fig = Figure(figsize=(15, 4.2))
    FigureCanvasAgg(fig)
    pr_ax, roc_ax, hist_ax = fig.subplots(1, 3)
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.13, top=0.9, wspace=0.25)
    curves = {"fused": arrays.fused, **arrays.evidence}
    for label, scores in curves.items():
        width = 2.2 if label == "fused" else 1.0
        precision, recall, _ = precision_recall_curve(arrays.y, scores)
        pr_ax.plot(*_thin(recall, precision), label=label, linewidth=width)
        fpr, tpr, _ = roc_curve(arrays.y, scores)
        roc_ax.plot(*_thin(fpr, tpr), label=label, linewidth=width)
    pr_ax.set(
        title=f"{name}: precision–recall", xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02)
    )
    pr_ax.legend(fontsize=7, loc="lower left")
    roc_ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8)
    roc_ax.set(title=f"{name}: ROC", xlabel="false positive rate", ylabel="true positive rate")
    roc_ax.legend(fontsize=7, loc="lower right")
    bins = np.linspace(0, 1, 41)
    hist_ax.hist(arrays.fused[~arrays.y], bins=bins, alpha=0.6, label="safe", color="tab:blue")
    hist_ax.hist(arrays.fused[arrays.y], bins=bins, alpha=0.6, label="unsafe", color="tab:red")
    rule = arrays.rule
    if rule.review is not None:
        hist_ax.axvspan(rule.review, rule.threshold, color="orange", alpha=0.15, label="review band")
    hist_ax.axvline(rule.threshold, color="black", linestyle="--", label=f"threshold {rule.threshold:.3f}")
    hist_ax.set(title=f"{name}: fused score ({rule.fusion})", xlabel="score", ylabel="images")
    hist_ax.set_yscale("log")
    hist_ax.legend(fontsize=7)
    return fig


def plot_category(name: str, arrays: Any, path: Path) -> None:
    """``category_figure`` written as a PNG."""
    category_figure(name, arrays).savefig(path, dpi=72)


def _table(headers: list[str], rows: list[list[Any]], ident: str | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    attr = f" id='{html.escape(ident, quote=True)}'" if ident else ""
    return f"<table{attr}><tr>{head}</tr>{body}</table>"


def _block_rows(block: dict[str, Any]) -> list[list[Any]]:
    ci = block.get("ci95") or {}
    return [[m, block.get(m), ci.get(m)] for m in ("precision", "recall", "f1", "accuracy", "fpr")]


def _confusion(confusion: dict[str, int]) -> list[list[Any]]:
    c = confusion
    return [["labelled unsafe", c["tp"], c["fn"]], ["labelled safe", c["fp"], c["tn"]]]


CONFUSION_HEADERS = ["", "predicted unsafe", "predicted safe"]
# What each input issue means, for the HTML page (report.json keeps the bare keys).
INPUT_ISSUES = {
    "labels_without_verdict": "labels without a verdict (left out)",
    "verdicts_without_label": "verdicts without a label (left out)",
    "duplicate_uris": "duplicate uris in the labels (the first row counts)",
    "duplicate_verdicts": "several verdicts for one image (the last counts)",
    "unknown_categories": "unknown categories (unsafe overall, unknown per category)",
    "unsafe_without_category": "unsafe without a category (unknown per category)",
    "safe_with_category": "labelled safe with a category (contradictory: counted safe)",
}


def _intervals_text(report: dict[str, Any]) -> str:
    boot = report["bootstrap"]
    if not boot["resamples"]:
        return "no intervals (--bootstrap 0)"
    return (
        "95 % intervals: Wilson score for precision, recall, accuracy and FPR; percentile bootstrap "
        f"for F1 and AUROC ({boot['resamples']} resamples, seed {boot['seed']})"
    )


def render_html(report: dict[str, Any], images: dict[str, Path]) -> str:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>modgate eval</title><style>",
        "body{font-family:sans-serif;margin:2em;max-width:90em}table{border-collapse:collapse;margin:1em 0}",
        "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#eee}",
        ".notes li{color:#a40}img{max-width:100%}</style></head><body>",
        f"<h1>modgate eval — policy {html.escape(report['policy_version'])}</h1>",
        f"<p>{report['n']} labelled images with a verdict; review counted as {report['review_as']}; "
        f"{html.escape(_intervals_text(report))}.</p>",
    ]
    notes = report.get("notes") or []
    if notes:
        items = "".join(f"<li>{html.escape(note)}</li>" for note in notes)
        parts.append(f"<ul class='notes' id='notes'>{items}</ul>")
    parts.append("<h2>Unsafe vs safe</h2>")
    overall = report.get("overall")
    if overall:
        parts.append(_table(["metric", "value", "95 % interval"], _block_rows(overall), "overall"))
        parts.append(_table(CONFUSION_HEADERS, _confusion(overall["confusion"]), "overall-confusion"))
    parts.append("<h2>Categories</h2>")
    parts.append(
        "<p>At the threshold: the category flagged. With review: flagged or in the review band "
        "(from the review start up to the threshold), what a person sees.</p>"
    )
    rows = []
    for name, c in report["categories"].items():
        at = c.get("at_threshold") or {}
        band = c.get("at_review") or {}
        ci = c.get("ci95") or {}
        rows.append(
            [name, c["fusion"], c["positives"], c["negatives"], c.get("uncovered_positives"), c["auroc"],
             ci.get("auroc"), c["average_precision"], at.get("threshold"), at.get("review"),
             at.get("precision"), ci.get("precision"), at.get("recall"), at.get("f1"), ci.get("f1"),
             at.get("fpr"), ci.get("fpr"), band.get("recall"), band.get("fpr"), c.get("reason") or ""]
        )  # fmt: skip
    headers = ["category", "fusion", "pos", "neg", "uncovered pos", "AUROC", "AUROC 95 %", "AP", "threshold",
               "review from", "precision", "precision 95 %", "recall", "F1", "F1 95 %", "FPR", "FPR 95 %",
               "recall with review", "FPR with review", "note"]  # fmt: skip
    parts.append(_table(headers, rows, "categories"))
    for name, c in report["categories"].items():
        at = c.get("at_threshold")
        if not at and not c["detectors"]:
            continue
        parts.append(f"<h3>{html.escape(name)}</h3>")
        if at:
            review = "none" if at.get("review") is None else _fmt(at["review"])
            parts.append(f"<p>threshold {_fmt(at['threshold'])}, review from {review}</p>")
            parts.append(_table(CONFUSION_HEADERS, _confusion(at["confusion"]), f"confusion-{name}"))
            band = c.get("at_review")
            if band:
                parts.append("<p>with the review band counted as flagged:</p>")
                parts.append(
                    _table(CONFUSION_HEADERS, _confusion(band["confusion"]), f"confusion-review-{name}")
                )
        # The same footing: best F1 over all thresholds for every score, fused included.
        det_rows = [
            ["fused", "", c["positives"] + c["negatives"], c["auroc"], c["average_precision"],
             c.get("best_f1"), (at or {}).get("f1")]
        ]  # fmt: skip
        for detector, per_score in c["detectors"].items():
            for score, m in per_score.items():
                det_rows.append(
                    [detector, score, m.get("n"), m["auroc"], m["average_precision"], m["best_f1"], None]
                )
        parts.append(
            _table(
                ["detector", "score", "images", "AUROC", "AP", "best F1", "F1 at threshold"],
                det_rows,
                f"detectors-{name}",
            )
        )
        if name in images:
            data = base64.b64encode(images[name].read_bytes()).decode()
            parts.append(f"<img alt='{html.escape(name)} curves' src='data:image/png;base64,{data}'>")
    if report["splits"]:
        parts.append("<h2>Splits</h2>")
        for split, block in report["splits"].items():
            parts.append(f"<h3>{html.escape(split)}</h3>")
            parts.append(_table(["metric", "value", "95 % interval"], _block_rows(block), f"split-{split}"))
            parts.append(
                _table(CONFUSION_HEADERS, _confusion(block["confusion"]), f"split-confusion-{split}")
            )
    parts.append("<h2>Input</h2>")
    issues = [
        [INPUT_ISSUES.get(k, k.replace("_", " ")), v["count"], ", ".join(v["examples"])]
        for k, v in report["unmatched"].items()
    ]
    issues += [[f"error verdict: {code}", n, ""] for code, n in report["errors"].items()]
    parts.append(_table(["what", "count", "first few"], issues, "input"))
    parts.append("</body></html>")
    return "".join(parts)


def write_report(out: Path, evaluation: Evaluation, plots: bool = True) -> Path:
    """Write report.json, the PNGs and report.html under ``out``; returns report.json's path."""
    out.mkdir(parents=True, exist_ok=True)
    images: dict[str, Path] = {}
    if plots:
        for name, arrays in evaluation.categories.items():
            path = out / f"{name}.png"
            plot_category(name, arrays, path)
            images[name] = path
    report_path = out / "report.json"
    report_path.write_text(json.dumps(evaluation.report, indent=2) + "\n")
    (out / "report.html").write_text(render_html(evaluation.report, images))
    return report_path


def summary_rows(report: dict[str, Any]) -> list[list[str]]:
    """The table ``modgate eval`` prints: overall first, then each category with labels."""
    rows = []
    overall = report.get("overall") or {}
    if overall:
        rows.append(
            ["overall", str(overall["positives"]), str(overall["negatives"]), "–", "–",
             _fmt(overall["precision"]), _fmt(overall["recall"]), _fmt(overall["f1"]), _fmt(overall["fpr"])]
        )  # fmt: skip
    for name, c in report["categories"].items():
        if c["positives"] + c["negatives"] == 0:
            continue
        at = c.get("at_threshold") or {}
        rows.append(
            [name, str(c["positives"]), str(c["negatives"]), _fmt(c["auroc"]), _fmt(c["average_precision"]),
             _fmt(at.get("precision")), _fmt(at.get("recall")), _fmt(at.get("f1")), _fmt(at.get("fpr"))]
        )  # fmt: skip
    return rows


SUMMARY_HEADERS = ["", "pos", "neg", "AUROC", "AP", "precision", "recall", "F1", "FPR"]


def summary_notes(report: dict[str, Any]) -> list[str]:
    """Lines ``modgate eval`` prints under its table: categories no detector covers."""
    return list(report.get("notes") or [])
