"""``modgate calibrate``: fit per-category thresholds (and optionally a logistic fusion of
the evidence scores) to labelled verdicts, and write a complete policy YAML.

Fitting works on the frame-fused detector scores exactly as a verdict stores them, and
every fused score here comes from ``worker.judge.aggregator.category_scores``, the formula the
worker and ``replay`` evaluate, so a calibrated policy does live what it did here. The
threshold and the review band are fitted on the scores of the rule written out (for
logistic fusion: the model refitted on every image), so the written policy, replayed on
its fitting data, meets the target and ``--review-recall`` by construction; the
cross-validated figures (each fold's threshold and band fitted without it) are what to
expect on new images.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
import yaml
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold

from modgate.policy import CATEGORIES, CategoryPolicy, Policy
from worker.judge.aggregator import category_scores
from worker.quality.labels import Joined
from worker.quality.replay import evidence_values, score_table

Fusion = Literal["max", "logistic"]
# Inverse regularisation strengths tried by cross-validation (log loss on held-out folds).
CS = (0.01, 0.1, 1.0, 10.0, 100.0)


class CalibrationError(ValueError):
    """A target or an input calibration cannot work with: the message says why."""


@dataclass(frozen=True)
class Target:
    kind: Literal["f1", "precision", "fpr"]
    value: float | None = None

    @classmethod
    def parse(cls, text: str) -> Target:
        """``f1``, ``precision=0.95`` or ``fpr=0.01``."""
        name, sep, raw = text.strip().lower().partition("=")
        if name == "f1" and not sep:
            return cls("f1")
        if name in ("precision", "fpr") and sep:
            try:
                value = float(raw)
            except ValueError:
                value = -1.0
            if 0.0 < value < 1.0:
                return cls(name, value)  # type: ignore[arg-type]
        raise CalibrationError(f"--target must be f1, precision=P or fpr=F with 0 < P, F < 1; got {text!r}")

    def __str__(self) -> str:
        return self.kind if self.value is None else f"{self.kind}={self.value:g}"


def _curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct scores (descending) with cumulative true and false positives when
    everything at or above each is flagged."""
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[s[1:] != s[:-1], True]  # last index of every run of equal scores
    return s[last], np.cumsum(y)[last], np.cumsum(~y)[last]


def _between(values: np.ndarray, k: int) -> float:
    """Halfway from distinct score ``k`` to the next lower one: the same training
    decisions, less sensitive to where new scores land."""
    if k + 1 < len(values):
        return float((values[k] + values[k + 1]) / 2)
    return float(values[k])


def fit_threshold(y: np.ndarray, s: np.ndarray, target: Target) -> tuple[float, str | None]:
    """The threshold (flag ``score >= t``) that meets ``target`` on (y, s); a note when it cannot."""
    y = np.asarray(y, bool)
    values, tp, fp = _curve(y, np.asarray(s, np.float64))
    positives, negatives = max(1, int(y.sum())), max(1, int((~y).sum()))
    above_all = float(min(1.0, np.nextafter(values[0], np.inf)))  # flags nothing
    if target.kind == "f1":
        f1 = 2 * tp / (tp + fp + positives)
        return _between(values, int(np.argmax(f1))), None
    if target.kind == "precision":
        precision = tp / (tp + fp)
        ok = np.flatnonzero(precision >= target.value)
        if ok.size == 0:
            k = int(np.argmax(precision))
            return _between(values, k), f"precision {target.value:g} not reached (best {precision[k]:.3f})"
        return _between(values, int(ok[-1])), None
    fpr = fp / negatives
    ok = np.flatnonzero(fpr <= target.value)
    if ok.size == 0:
        return above_all, f"FPR {target.value:g} needs flagging nothing"
    return _between(values, int(ok[-1])), None


def fit_review(y: np.ndarray, s: np.ndarray, threshold: float, recall: float) -> float | None:
    """Lower edge of the review band: the highest edge where flagged + review together
    reach ``recall`` of the positives; None when the threshold alone does."""
    y = np.asarray(y, bool)
    values, tp, _ = _curve(y, np.asarray(s, np.float64))
    positives = max(1, int(y.sum()))
    if (y & (s >= threshold)).sum() / positives >= recall:
        return None
    ok = np.flatnonzero((tp / positives >= recall) & (values <= threshold))
    k = int(ok[0]) if ok.size else len(values) - 1
    return min(threshold, _between(values, k))


@dataclass
class CategoryFit:
    name: str
    rule: CategoryPolicy
    positives: int = 0
    negatives: int = 0
    note: str | None = None  # why the base rule was kept, or a target not met
    cv: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        counts = f"{self.positives} positives / {self.negatives} negatives"
        if not self.cv:
            return f"{self.name}: kept from the base policy ({self.note}); {counts}"
        cv = ", ".join(f"{k} {v:.3f}" for k, v in self.cv.items())
        review = "none" if self.rule.review is None else f"{self.rule.review:.4f}"
        line = (
            f"{self.name}: {self.rule.fusion}, {counts}; threshold {self.rule.threshold:.4f}, review {review}"
        )
        return line + f"; cross-validated {cv}" + (f" ({self.note})" if self.note else "")


def _cv_metrics(
    y: np.ndarray, s: np.ndarray, folds: StratifiedKFold, target: Target, review_recall: float
) -> dict[str, float]:
    """Held-out-fold metrics of the whole procedure: for each fold, a threshold and review
    band fitted on the other folds' scores decide this fold's images."""
    pred = np.zeros(len(y), bool)
    seen = np.zeros(len(y), bool)  # flagged or in the review band
    for train, test in folds.split(s.reshape(-1, 1), y):
        threshold, _ = fit_threshold(y[train], s[train], target)
        review = fit_review(y[train], s[train], threshold, review_recall)
        pred[test] = s[test] >= threshold
        seen[test] = s[test] >= (threshold if review is None else review)
    tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
    fn, tn = int((~pred & y).sum()), int((~pred & ~y).sum())
    return {
        "f1": 2 * tp / max(1, 2 * tp + fp + fn),
        "precision": tp / max(1, tp + fp),
        "recall": tp / max(1, tp + fn),
        "fpr": fp / max(1, fp + tn),
        "auroc": float(roc_auc_score(y, s)),
        "review_recall": int((seen & y).sum()) / max(1, int(y.sum())),
    }


def _logistic(X: np.ndarray, y: np.ndarray, C: float, seed: int) -> LogisticRegression:
    # Class-weighted so a rare category is not fitted to "never"; L2-regularised by C.
    model = LogisticRegression(C=C, class_weight="balanced", max_iter=5000, random_state=seed)
    return model.fit(X, y)


def _rule(base: CategoryPolicy, keys: list[str], model: LogisticRegression) -> CategoryPolicy:
    weights = {k: float(w) for k, w in zip(keys, model.coef_[0], strict=True)}
    return base.model_copy(
        update={"fusion": "logistic", "weights": weights, "bias": float(model.intercept_[0])}
    )


def _fit_logistic(
    base: CategoryPolicy, values: dict[str, np.ndarray], y: np.ndarray, folds: StratifiedKFold, seed: int
) -> tuple[CategoryPolicy, np.ndarray]:
    """The regularisation strength with the best held-out log loss, the model refitted on
    everything, and its out-of-fold scores (computed by the aggregator's formula)."""
    keys = sorted(values)
    X = np.column_stack([values[k] for k in keys])
    splits = list(folds.split(X, y))
    best: tuple[float, float, np.ndarray] | None = None
    for C in CS:
        oof = np.empty(len(y))
        for train, test in splits:
            rule = _rule(base, keys, _logistic(X[train], y[train], C, seed))
            oof[test] = category_scores(rule, {k: X[test, j] for j, k in enumerate(keys)})
        p = np.clip(oof, 1e-12, 1 - 1e-12)
        # Class-balanced log loss, matching the class-weighted fit.
        loss = -(np.log(p[y]).mean() + np.log(1 - p[~y]).mean())
        if best is None or loss < best[0] - 1e-9:
            best = (loss, C, oof)
    assert best is not None
    return _rule(base, keys, _logistic(X, y, best[1], seed)), best[2]


@dataclass
class Calibration:
    policy: Policy
    fits: dict[str, CategoryFit]
    n: int
    target: Target
    fusion: Fusion
    review_recall: float
    folds: int
    seed: int

    def header(self, sources: str = "") -> str:
        when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        lines = [
            f"modgate policy {self.policy.version}, written by `modgate calibrate` on {when}",
            f"fitted on n={self.n} labelled verdicts{' (' + sources + ')' if sources else ''}",
            f"target {self.target}, fusion {self.fusion}, review band to recall {self.review_recall:g}, "
            f"{self.folds}-fold cross-validation, seed {self.seed}",
            "target and review recall hold on these verdicts by construction (threshold and band "
            "fitted on the written rule's scores); cross-validated figures estimate new images",
            *(fit.describe() for fit in self.fits.values()),
        ]
        return "".join(f"# {line}\n" for line in lines)

    def yaml(self, sources: str = "") -> str:
        body = yaml.safe_dump(self.policy.model_dump(mode="json"), sort_keys=False, width=100)
        return self.header(sources) + body


def calibrate(
    joined: Joined,
    base: Policy,
    target: Target,
    fusion: Fusion = "max",
    review_recall: float = 0.95,
    folds: int = 5,
    seed: int = 0,
    min_positives: int = 20,
) -> Calibration:
    """Fit every category that has enough labels; keep the base rule (and say why) otherwise."""
    if not 0.0 < review_recall <= 1.0:
        raise CalibrationError(f"--review-recall must be in (0, 1], got {review_recall}")
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    categories: dict[str, Any] = {}
    fits: dict[str, CategoryFit] = {}
    table = score_table(joined.verdicts)
    for name in CATEGORIES:
        rule = base.categories[name]  # type: ignore[index]
        fit = CategoryFit(name, rule)
        fits[name] = fit
        categories[name] = rule
        truth = joined.truth(name)
        known = ~np.isnan(truth)
        values = {k: v for k, v in evidence_values(table, rule).items() if not np.isnan(v[known]).all()}
        if not values:
            fit.note = "no labelled verdict carries its evidence"
            continue
        # Max fusion: a detector that did not run adds nothing; images nobody covered are out.
        covered = known & np.any([~np.isnan(v) for v in values.values()], axis=0)
        y = truth[covered].astype(bool)
        fit.positives, fit.negatives = int(y.sum()), int((~y).sum())
        if fit.positives < max(min_positives, folds) or fit.negatives < folds:
            fit.note = f"only {fit.positives} positives and {fit.negatives} negatives (< {min_positives})"
            continue
        max_rule = rule.model_copy(update={"fusion": "max", "weights": None, "bias": None})
        filled = {k: np.nan_to_num(v[covered], nan=0.0) for k, v in values.items()}
        if fusion == "logistic":
            # Only evidence every image has: a logistic score never runs with an input missing.
            complete = {k: v[covered] for k, v in values.items() if not np.isnan(v[covered]).any()}
            if not complete:
                fit.note = "no evidence score is present in every verdict"
                continue
            new, held_out = _fit_logistic(max_rule, complete, y, splitter, seed)
            # The written model's own scores: what replay and the worker will compute.
            scores = category_scores(new, complete)
        else:
            new, scores = max_rule, category_scores(max_rule, filled)
            held_out = scores  # nothing fitted but the threshold: no model to hold out
        threshold, fit.note = fit_threshold(y, scores, target)
        review = fit_review(y, scores, threshold, review_recall)
        fit.rule = new.model_copy(update={"threshold": threshold, "review": review})
        fit.cv = _cv_metrics(y, held_out, splitter, target, review_recall)
        categories[name] = fit.rule
    data = base.model_dump(mode="json")
    data["categories"] = {k: v.model_dump(mode="json") for k, v in categories.items()}
    stem = base.version.split("+cal.")[0]
    digest = hashlib.sha256(yaml.safe_dump(data["categories"], sort_keys=True).encode()).hexdigest()[:8]
    data["version"] = f"{stem}+cal.{digest}"
    return Calibration(
        Policy.model_validate(data), fits, len(joined.verdicts), target, fusion, review_recall, folds, seed
    )
