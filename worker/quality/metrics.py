"""Metrics of labelled verdicts: scikit-learn's point estimates, Wilson score intervals for
the proportions (precision, recall, accuracy, FPR: they stay wide when a sample has no
false positive, where a bootstrap collapses to [1, 1]) and seeded, vectorised bootstrap
intervals for F1 and AUROC. Input: labels joined to verdicts; output: the ``report.json``
dict (plus the arrays ``report.py`` draws curves from)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.stats import binomtest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    f1_score,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
)

from modgate.policy import CATEGORIES, CategoryPolicy, Policy
from worker.quality.labels import Joined
from worker.quality.replay import check_policy, evidence_values, reaggregate, score_table

LEVEL = 0.95
BINARY = ("precision", "recall", "f1", "accuracy", "fpr")
# How each ``ci95`` entry is computed (report.json's ``intervals``).
INTERVALS = {
    "precision": "wilson",
    "recall": "wilson",
    "accuracy": "wilson",
    "fpr": "wilson",
    "f1": "bootstrap percentile",
    "auroc": "bootstrap percentile",
}


def _num(value: Any) -> float | None:
    """JSON-safe: NaN (undefined) becomes null."""
    value = float(value)
    return None if np.isnan(value) else value


def binary_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, Any]:
    """Precision, recall, F1, accuracy, FPR and the confusion counts; a metric that is
    undefined (no positives, no negatives, nothing predicted) is null with a reason."""
    y_true, y_pred = np.asarray(y_true, bool), np.asarray(y_pred, bool)
    tn, fp, fn, tp = (int(x) for x in confusion_matrix(y_true, y_pred, labels=[False, True]).ravel())
    out: dict[str, Any] = {
        "positives": tp + fn,
        "negatives": tn + fp,
        "precision": _num(precision_score(y_true, y_pred, zero_division=np.nan)),
        "recall": _num(recall_score(y_true, y_pred, zero_division=np.nan)),
        "f1": _num(f1_score(y_true, y_pred, zero_division=np.nan)) if tp + fn else None,
        "accuracy": _num(accuracy_score(y_true, y_pred)) if len(y_true) else None,
        "fpr": fp / (fp + tn) if fp + tn else None,
        "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
    }
    reasons = []
    if tp + fn == 0:
        reasons.append("no positives: recall and F1 are undefined")
    if fp + tn == 0:
        reasons.append("no negatives: FPR is undefined")
    if tp + fp == 0:
        reasons.append("nothing predicted positive: precision is undefined")
    out["reason"] = "; ".join(reasons) or None
    return out


def wilson(successes: int, trials: int) -> list[float] | None:
    """Wilson score interval of a proportion at ``LEVEL``; None without trials."""
    if trials <= 0:
        return None
    ci = binomtest(int(successes), int(trials)).proportion_ci(confidence_level=LEVEL, method="wilson")
    return [float(ci.low), float(ci.high)]


def proportion_intervals(confusion: dict[str, int]) -> dict[str, list[float] | None]:
    """Wilson intervals of precision, recall, accuracy and FPR from confusion counts."""
    tp, fp, fn, tn = (confusion[k] for k in ("tp", "fp", "fn", "tn"))
    return {
        "precision": wilson(tp, tp + fp),
        "recall": wilson(tp, tp + fn),
        "accuracy": wilson(tp + tn, tp + fp + fn + tn),
        "fpr": wilson(fp, fp + tn),
    }


def score_metrics(y_true: np.ndarray, scores: np.ndarray) -> dict[str, float | None]:
    """Threshold-free quality of one score: AUROC, average precision, best F1 on the PR curve."""
    y_true = np.asarray(y_true, bool)
    if y_true.all() or not y_true.any():
        return {"auroc": None, "average_precision": None, "best_f1": None}
    precision, recall, _ = precision_recall_curve(y_true, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return {
        "auroc": float(roc_auc_score(y_true, scores)),
        "average_precision": float(average_precision_score(y_true, scores)),
        "best_f1": float(np.max(f1)),
    }


class Bootstrap:
    """``resamples`` resamples of ``n`` items with replacement, held as a count matrix
    (resample × item), so every metric is a matrix product rather than a Python loop."""

    def __init__(self, n: int, resamples: int, seed: int | Sequence[int]) -> None:
        self.n, self.resamples = n, resamples
        rng = np.random.default_rng(seed)
        counts = np.empty((resamples, n), dtype=np.float32)
        step = max(1, 2_000_000 // max(1, n))  # bound the temporary index array
        for start in range(0, resamples, step):
            rows = min(step, resamples - start)
            idx = rng.integers(0, n, size=(rows, n)) + (np.arange(rows) * n)[:, None]
            counts[start : start + rows] = np.bincount(idx.ravel(), minlength=rows * n).reshape(rows, n)
        self.counts = counts

    @staticmethod
    def interval(values: np.ndarray) -> list[float] | None:
        values = values[~np.isnan(values)]
        if values.size == 0:
            return None
        low, high = np.percentile(values, [50 * (1 - LEVEL), 100 - 50 * (1 - LEVEL)])
        return [float(low), float(high)]

    def _columns(self, mask: np.ndarray | None) -> np.ndarray:
        return np.arange(self.n) if mask is None else np.flatnonzero(mask)

    def binary(self, y_true: np.ndarray, y_pred: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """(resamples, 5): precision, recall, F1, accuracy, FPR (NaN where undefined).
        ``y_true``/``y_pred`` are the items selected by ``mask`` (all items without one)."""
        y, p = np.asarray(y_true, bool), np.asarray(y_pred, bool)
        indicators = np.zeros((self.n, 4), dtype=np.float32)
        indicators[self._columns(mask)] = np.stack([y & p, ~y & p, y & ~p, ~y & ~p], axis=1)
        tp, fp, fn, tn = (self.counts @ indicators).astype(np.float64).T
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.stack(
                [
                    tp / (tp + fp),
                    tp / (tp + fn),
                    np.where(tp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan),
                    (tp + tn) / (tp + fp + fn + tn),
                    fp / (fp + tn),
                ],
                axis=1,
            )

    def auroc(self, y_true: np.ndarray, scores: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """AUROC of every resample (ties count one half): for each positive, the resampled
        negatives below it come from one cumulative sum over the negatives in score order."""
        y, s = np.asarray(y_true, bool), np.asarray(scores, np.float64)
        columns = self._columns(mask)
        order = np.argsort(s[~y], kind="mergesort")
        negatives = s[~y][order]
        # Column 0 is "no negative below": positions index the cumulative sum directly.
        cum = np.zeros((self.resamples, len(negatives) + 1), dtype=np.float32)
        np.cumsum(self.counts[:, columns[~y][order]], axis=1, out=cum[:, 1:])
        below = np.searchsorted(negatives, s[y], "left")
        upto = np.searchsorted(negatives, s[y], "right")
        # below + half the ties = (negatives < s + negatives <= s) / 2
        ranks = cum[:, below] + cum[:, upto]
        positive_counts = self.counts[:, columns[y]]
        numerator = 0.5 * np.einsum("ij,ij->i", positive_counts, ranks, dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return numerator / (positive_counts.sum(axis=1, dtype=np.float64) * cum[:, -1].astype(np.float64))


@dataclass
class CategoryArrays:
    """One category's labelled images that the policy covers: what ``report.py`` draws."""

    rule: CategoryPolicy
    y: np.ndarray
    fused: np.ndarray
    flagged: np.ndarray
    evidence: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Evaluation:
    report: dict[str, Any]
    categories: dict[str, CategoryArrays]


def overall_block(
    y: np.ndarray, pred: np.ndarray, boot: Bootstrap | None, mask: np.ndarray | None = None
) -> dict[str, Any]:
    block = binary_metrics(y if mask is None else y[mask], pred if mask is None else pred[mask])
    if boot is not None:
        samples = boot.binary(y if mask is None else y[mask], pred if mask is None else pred[mask])
        f1 = Bootstrap.interval(samples[:, BINARY.index("f1")])
        intervals = {**proportion_intervals(block["confusion"]), "f1": f1}
        block["ci95"] = {name: intervals[name] for name in BINARY}
    return block


def evaluate(
    joined: Joined,
    policy: Policy,
    review_as: str = "unsafe",
    resamples: int = 1000,
    seed: int = 0,
) -> Evaluation:
    """The report: overall, per category (fused score beside each detector score), per split."""
    check_policy(policy, joined.verdicts)
    verdicts = [reaggregate(v, policy) for v in joined.verdicts]
    table = score_table(verdicts)
    n = len(verdicts)
    y = joined.unsafe
    decisions = np.array([v.decision for v in verdicts], dtype=object)
    pred = (decisions == "unsafe") | ((decisions == "review") if review_as == "unsafe" else False)
    boot = Bootstrap(n, resamples, seed) if resamples > 0 and n > 0 else None

    report: dict[str, Any] = {
        "n": n,
        "policy_version": policy.version,
        "review_as": review_as,
        "bootstrap": {"resamples": resamples, "seed": seed, "level": LEVEL},
        "intervals": INTERVALS,
        "verdict_policy_versions": dict(sorted(_count(v.policy_version for v in joined.verdicts).items())),
        "overall": overall_block(y, pred, boot) if n else None,
        "categories": {},
        "splits": {},
    }
    arrays: dict[str, CategoryArrays] = {}
    notes: list[str] = []
    for name in CATEGORIES:
        rule = policy.categories[name]  # type: ignore[index]
        truth = joined.truth(name)
        fused = np.array(
            [np.nan if v.categories[name].score is None else v.categories[name].score for v in verdicts]
        )
        flagged = np.array([v.categories[name].flagged for v in verdicts], dtype=bool)
        review = np.array([v.categories[name].review for v in verdicts], dtype=bool)
        known = ~np.isnan(truth)
        mask = known & ~np.isnan(fused)
        yc = truth[mask].astype(bool)
        uncovered = known & np.isnan(fused)
        uncovered_positives = int((truth[uncovered] == 1).sum())
        entry: dict[str, Any] = {
            "fusion": rule.fusion,
            "positives": int(yc.sum()),
            "negatives": int((~yc).sum()),
            "unlabelled": int((~known).sum()),
            "uncovered": int(uncovered.sum()),
            "uncovered_positives": uncovered_positives,
            "uncovered_negatives": int(uncovered.sum()) - uncovered_positives,
            "auroc": None,
            "average_precision": None,
            "best_f1": None,
            "at_threshold": None,
            "at_review": None,
            "detectors": {},
            "reason": None,
        }
        report["categories"][name] = entry
        if uncovered_positives and not mask.any():
            notes.append(f"{uncovered_positives} labelled images in {name}, no enabled detector covers it")
        elif uncovered_positives:
            notes.append(
                f"{uncovered_positives} of {uncovered_positives + entry['positives']} labelled images in "
                f"{name} have no score from its detectors, left out of its metrics"
            )
        if not mask.any():
            if not n:
                entry["reason"] = "no labelled image has an ok verdict"
            elif known.any():
                entry["reason"] = (
                    f"no enabled detector covers it ({uncovered_positives} labelled positives, "
                    f"{entry['uncovered_negatives']} negatives)"
                )
            else:
                entry["reason"] = "no label says anything about this category"
            continue
        if yc.all() or not yc.any():
            entry["reason"] = "no positives" if not yc.any() else "no negatives"
            continue
        at = binary_metrics(yc, flagged[mask])
        entry["at_threshold"] = {
            "threshold": rule.threshold,
            "review": rule.review,
            **{k: at[k] for k in ("precision", "recall", "f1", "fpr", "confusion")},
        }
        if rule.review is not None:
            # The band's images go to a person: what flagged + review together catch and cost.
            band = binary_metrics(yc, flagged[mask] | review[mask])
            entry["at_review"] = {
                "review": rule.review,
                **{k: band[k] for k in ("precision", "recall", "f1", "fpr", "confusion")},
            }
        entry.update(score_metrics(yc, fused[mask]))
        if boot is not None:
            entry["ci95"] = {
                **{k: v for k, v in proportion_intervals(at["confusion"]).items() if k != "accuracy"},
                "f1": Bootstrap.interval(boot.binary(yc, flagged[mask], mask)[:, 2]),
                "auroc": Bootstrap.interval(boot.auroc(yc, fused[mask], mask)),
            }
        evidence = {}
        for key, values in evidence_values(table, rule).items():
            ok = known & ~np.isnan(values)
            ye = truth[ok].astype(bool)
            detector, _, score = key.partition(".")
            # n beside best F1: the fused score's and each detector's, on the images each scored.
            entry["detectors"].setdefault(detector, {})[score] = {
                **score_metrics(ye, values[ok]),
                "n": int(ok.sum()),
            }
            if not np.isnan(values[mask]).any():  # drawn beside the fused score: same images
                evidence[key] = values[mask]
        arrays[name] = CategoryArrays(rule, yc, fused[mask], flagged[mask], evidence)
    report["notes"] = notes

    splits = np.array([s if s is not None else "" for s in joined.splits], dtype=object)
    for i, split in enumerate(sorted({s for s in joined.splits if s is not None})):
        in_split = splits == split
        sub = Bootstrap(int(in_split.sum()), resamples, [seed, i + 1]) if boot is not None else None
        report["splits"][split] = overall_block(y[in_split], pred[in_split], sub)
    return Evaluation(report, arrays)


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out
