"""What ``modgate eval`` leaves behind: ``report.json``, one PNG per category (precision–
recall and ROC of the fused score beside each detector score, and the score histogram
safe vs unsafe with the threshold and review band), and ``report.html`` embedding them
all (no network needed to view it)."""

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


def plot_category(name: str, arrays: Any, path: Path) -> None:
    """PR and ROC curves (fused score and each detector score) and the score histogram."""
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
    fig.savefig(path, dpi=72)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _block_rows(block: dict[str, Any]) -> list[list[Any]]:
    ci = block.get("ci95") or {}
    return [[m, block.get(m), ci.get(m)] for m in ("precision", "recall", "f1", "accuracy", "fpr")]


def render_html(report: dict[str, Any], images: dict[str, Path]) -> str:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>modgate eval</title><style>",
        "body{font-family:sans-serif;margin:2em;max-width:80em}table{border-collapse:collapse;margin:1em 0}",
        "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#eee}",
        "img{max-width:100%}</style></head><body>",
        f"<h1>modgate eval — policy {html.escape(report['policy_version'])}</h1>",
        f"<p>{report['n']} labelled images with a verdict; review counted as {report['review_as']}; "
        f"95 % bootstrap intervals from {report['bootstrap']['resamples']} resamples "
        f"(seed {report['bootstrap']['seed']}).</p>",
        "<h2>Unsafe vs safe</h2>",
    ]
    overall = report.get("overall")
    if overall:
        parts.append(_table(["metric", "value", "95 % interval"], _block_rows(overall)))
        parts.append(_table(["", "predicted unsafe", "predicted safe"], _confusion(overall)))
    parts.append("<h2>Categories</h2>")
    rows = []
    for name, c in report["categories"].items():
        at = c.get("at_threshold") or {}
        ci = c.get("ci95") or {}
        rows.append(
            [name, c["fusion"], c["positives"], c["negatives"], c["auroc"], ci.get("auroc"),
             c["average_precision"], at.get("threshold"), at.get("precision"), at.get("recall"),
             at.get("f1"), ci.get("f1"), at.get("fpr"), c.get("reason") or ""]
        )  # fmt: skip
    headers = ["category", "fusion", "pos", "neg", "AUROC", "AUROC 95 %", "AP", "threshold", "precision",
               "recall", "F1", "F1 95 %", "FPR", "note"]  # fmt: skip
    parts.append(_table(headers, rows))
    for name, c in report["categories"].items():
        if not c["detectors"]:
            continue
        parts.append(f"<h3>{html.escape(name)}</h3>")
        det_rows = [
            ["fused", "", c["auroc"], c["average_precision"], (c.get("at_threshold") or {}).get("f1")]
        ]
        for detector, per_score in c["detectors"].items():
            for score, m in per_score.items():
                det_rows.append([detector, score, m["auroc"], m["average_precision"], m["best_f1"]])
        parts.append(
            _table(["detector", "score", "AUROC", "AP", "best F1 (fused: F1 at threshold)"], det_rows)
        )
        if name in images:
            data = base64.b64encode(images[name].read_bytes()).decode()
            parts.append(f"<img alt='{html.escape(name)} curves' src='data:image/png;base64,{data}'>")
    if report["splits"]:
        parts.append("<h2>Splits</h2>")
        for split, block in report["splits"].items():
            parts.append(f"<h3>{html.escape(split)}</h3>")
            parts.append(_table(["metric", "value", "95 % interval"], _block_rows(block)))
    parts.append("<h2>Input</h2>")
    issues = [[k, v["count"], ", ".join(v["examples"])] for k, v in report["unmatched"].items()]
    issues += [[f"error verdict: {code}", n, ""] for code, n in report["errors"].items()]
    parts.append(_table(["what", "count", "first few"], issues))
    parts.append("</body></html>")
    return "".join(parts)


def _confusion(block: dict[str, Any]) -> list[list[Any]]:
    c = block["confusion"]
    return [["labelled unsafe", c["tp"], c["fn"]], ["labelled safe", c["fp"], c["tn"]]]


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
