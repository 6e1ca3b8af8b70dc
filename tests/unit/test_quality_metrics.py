"""Report metrics against scikit-learn computed here, and confusion counts by hand."""

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from modgate.policy import CATEGORIES, Policy, deep_merge, default_policy_dict
from worker.quality.labels import LabelRow, LabelSet, join
from worker.quality.metrics import Bootstrap, binary_metrics, evaluate, score_metrics
from worker.quality.synthetic import generate

Y = np.array([1, 1, 1, 0, 0, 0, 0, 1, 0, 0], bool)
P = np.array([1, 0, 1, 1, 0, 0, 0, 1, 0, 1], bool)
S = np.array([0.9, 0.4, 0.8, 0.7, 0.1, 0.2, 0.3, 0.95, 0.05, 0.6])


def test_binary_metrics_equal_sklearn_and_hand_counts():
    m = binary_metrics(Y, P)
    # By hand: tp = items 0, 2, 7; fn = 1; fp = 3, 9; tn = 4, 5, 6, 8.
    assert m["confusion"] == {"tp": 3, "fp": 2, "fn": 1, "tn": 4}
    assert m["precision"] == pytest.approx(precision_score(Y, P)) == pytest.approx(3 / 5)
    assert m["recall"] == pytest.approx(recall_score(Y, P))
    assert m["f1"] == pytest.approx(f1_score(Y, P))
    assert m["accuracy"] == pytest.approx(accuracy_score(Y, P))
    assert m["fpr"] == pytest.approx(2 / 6)
    assert m["reason"] is None


def test_undefined_metrics_are_null_with_a_reason():
    m = binary_metrics(np.zeros(4, bool), np.array([1, 0, 0, 0], bool))
    assert m["recall"] is None and m["f1"] is None and "no positives" in m["reason"]
    assert m["fpr"] == pytest.approx(0.25)
    assert score_metrics(np.zeros(4, bool), np.arange(4.0)) == {
        "auroc": None,
        "average_precision": None,
        "best_f1": None,
    }


def test_score_metrics_equal_sklearn():
    m = score_metrics(Y, S)
    assert m["auroc"] == pytest.approx(roc_auc_score(Y, S))
    assert m["average_precision"] == pytest.approx(average_precision_score(Y, S))
    best = max(f1_score(Y, t <= S) for t in S)
    assert m["best_f1"] == pytest.approx(best)


def test_vectorised_bootstrap_equals_sklearn_on_each_resample():
    rng = np.random.default_rng(3)
    y = rng.random(300) < 0.3
    s = np.round(rng.random(300) * 0.6 + 0.3 * y, 2)  # rounded: many ties
    mask = rng.random(300) < 0.8
    boot = Bootstrap(300, 50, seed=7)
    auc = boot.auroc(y[mask], s[mask], mask)
    binary = boot.binary(y[mask], s[mask] >= 0.5, mask)
    for r in range(5):
        w = boot.counts[r][mask]
        assert auc[r] == pytest.approx(roc_auc_score(y[mask], s[mask], sample_weight=w))
        assert binary[r, 2] == pytest.approx(f1_score(y[mask], s[mask] >= 0.5, sample_weight=w))
        assert binary[r, 0] == pytest.approx(precision_score(y[mask], s[mask] >= 0.5, sample_weight=w))
    assert boot.counts.sum(axis=1) == pytest.approx(np.full(50, 300))


def _joined(n=600, seed=1, **kw):
    verdicts, rows = generate(n, seed=seed, **kw)
    from pathlib import Path

    label_rows = [
        LabelRow(
            uri=r["uri"],
            key=str(Path("/synthetic") / r["uri"]),
            unsafe=r["label"] == "unsafe",
            truth={c: int(c == r["category"]) for c in CATEGORIES},
            split=r["split"],
            line=i + 2,
        )
        for i, r in enumerate(rows)
    ]
    return join(LabelSet(label_rows, "unsafebench"), verdicts)


def test_report_numbers_equal_sklearn_and_intervals_hold_the_point():
    joined = _joined(error_rate=0.05)
    policy = Policy.model_validate(default_policy_dict())
    report = evaluate(joined, policy, resamples=200, seed=5).report
    decisions = np.array([v.decision for v in joined.verdicts])
    y = joined.unsafe
    pred = decisions != "safe"  # review counts as unsafe by default
    overall = report["overall"]
    assert report["n"] == len(joined.verdicts) and joined.error_codes["corrupt_image"] > 0
    assert overall["f1"] == pytest.approx(f1_score(y, pred))
    assert overall["precision"] == pytest.approx(precision_score(y, pred))
    tp = int((y & pred).sum())
    assert overall["confusion"]["tp"] == tp
    for name, value in overall["ci95"].items():
        low, high = value
        assert low <= overall[name] <= high, name
    sexual = report["categories"]["sexual"]
    truth = joined.truth("sexual").astype(bool)
    fused = np.array([v.categories["sexual"].score for v in joined.verdicts])
    assert sexual["auroc"] == pytest.approx(roc_auc_score(truth, fused))
    assert sexual["average_precision"] == pytest.approx(average_precision_score(truth, fused))
    flagged = fused >= policy.categories["sexual"].threshold
    assert sexual["at_threshold"]["f1"] == pytest.approx(f1_score(truth, flagged))
    assert sexual["ci95"]["auroc"][0] <= sexual["auroc"] <= sexual["ci95"]["auroc"][1]
    assert sexual["ci95"]["f1"][0] <= sexual["at_threshold"]["f1"] <= sexual["ci95"]["f1"][1]
    open_nsfw = np.array([v.detectors["open_nsfw"].scores["nsfw"] for v in joined.verdicts])
    assert sexual["detectors"]["open_nsfw"]["nsfw"]["auroc"] == pytest.approx(roc_auc_score(truth, open_nsfw))
    assert set(report["splits"]) == {"ai", "real"}
    ai = np.array([r.split == "ai" for r in joined.rows])
    assert report["splits"]["ai"]["recall"] == pytest.approx(recall_score(y[ai], pred[ai]))
    again = evaluate(joined, policy, resamples=200, seed=5).report
    assert again["overall"]["ci95"] == overall["ci95"]
    other = evaluate(joined, policy, resamples=200, seed=6).report
    assert other["overall"]["ci95"] != overall["ci95"]


def test_review_as_safe_and_policy_reaggregation():
    joined = _joined(n=300)
    strict = Policy.model_validate(
        deep_merge(
            default_policy_dict(),
            {"version": "strict", "categories": {"sexual": {"threshold": 0.3, "review": 0.2}}},
        )
    )
    base = evaluate(joined, Policy.model_validate(default_policy_dict()), "safe", resamples=0).report
    stricter = evaluate(joined, strict, "safe", resamples=0).report
    assert stricter["policy_version"] == "strict" and "ci95" not in stricter["overall"]
    assert stricter["categories"]["sexual"]["at_threshold"]["threshold"] == 0.3
    assert stricter["overall"]["confusion"]["tp"] >= base["overall"]["confusion"]["tp"]
    decisions = np.array([v.decision for v in joined.verdicts])
    assert base["overall"]["confusion"]["tp"] == int((joined.unsafe & (decisions == "unsafe")).sum())


def test_a_category_without_positives_reports_null_with_reason():
    joined = _joined(n=200, categories=["violence"])
    report = evaluate(joined, Policy.model_validate(default_policy_dict()), resamples=20).report
    spam = report["categories"]["spam"]
    assert spam["positives"] == 0 and spam["auroc"] is None and spam["reason"] == "no positives"
    assert report["categories"]["violence"]["auroc"] is not None


def test_a_labelled_category_no_detector_covers_is_reported_with_its_count():
    from worker.quality.report import summary_notes
    from worker.quality.synthetic import CALIBRATION_SCORES

    # Only sexual's detectors ran: the spam positives have no score at all.
    joined = _joined(n=400, seed=2, scores=CALIBRATION_SCORES, categories=["sexual", "spam"])
    spam_positives = int(np.nansum(joined.truth("spam")))
    report = evaluate(joined, Policy.model_validate(default_policy_dict()), resamples=20).report
    spam = report["categories"]["spam"]
    assert spam_positives > 0 and spam["positives"] == 0
    assert spam["uncovered_positives"] == spam_positives
    assert spam["uncovered_negatives"] == len(joined.rows) - spam_positives
    note = f"{spam_positives} labelled images in spam, no enabled detector covers it"
    assert report["notes"] == [note] and summary_notes(report) == [note]  # hate etc.: no positives


def test_category_confusion_review_band_and_best_f1_equal_sklearn():
    from sklearn.metrics import confusion_matrix

    joined = _joined(n=600, seed=3)
    policy = Policy.model_validate(default_policy_dict())
    report = evaluate(joined, policy, resamples=50).report
    sexual = report["categories"]["sexual"]
    truth = joined.truth("sexual").astype(bool)
    cats = [v.categories["sexual"] for v in joined.verdicts]
    flagged = np.array([c.flagged for c in cats])
    seen = flagged | np.array([c.review for c in cats])
    tn, fp, fn, tp = confusion_matrix(truth, flagged).ravel()
    assert sexual["at_threshold"]["confusion"] == {"tp": tp, "fp": fp, "fn": fn, "tn": tn}
    assert sexual["at_threshold"]["review"] == policy.categories["sexual"].review == 0.5
    tn, fp, fn, tp = confusion_matrix(truth, seen).ravel()
    band = sexual["at_review"]
    assert band["confusion"] == {"tp": tp, "fp": fp, "fn": fn, "tn": tn} and band["review"] == 0.5
    assert band["fpr"] == pytest.approx(fp / (fp + tn)) and band["recall"] == pytest.approx(tp / (tp + fn))
    assert band["fpr"] > sexual["at_threshold"]["fpr"]  # the band costs false positives
    fused = np.array([c.score for c in cats])
    # Fused and detectors on the same footing: best F1 over thresholds for both, with n.
    best = max(f1_score(truth, fused >= t) for t in np.unique(fused))
    assert sexual["best_f1"] == pytest.approx(best)
    assert sexual["detectors"]["open_nsfw"]["nsfw"]["n"] == len(joined.rows)
    assert (
        report["intervals"]["precision"] == "wilson" and report["intervals"]["f1"] == "bootstrap percentile"
    )


def test_precision_interval_with_no_false_positive_does_not_collapse():
    from worker.quality.metrics import overall_block

    y = np.array([1] * 20 + [0] * 30, bool)
    pred = np.array([1] * 15 + [0] * 5 + [0] * 30, bool)  # tp 15, fn 5, fp 0, tn 30
    block = overall_block(y, pred, Bootstrap(len(y), 200, seed=1))
    z = 1.959963984540054
    # Wilson score interval by hand: k = n gives [n / (n + z²), 1]; k = 0 gives [0, z² / (n + z²)].
    low, high = block["ci95"]["precision"]
    assert (
        block["precision"] == 1.0 and low == pytest.approx(15 / (15 + z * z)) and high == pytest.approx(1.0)
    )
    low, high = block["ci95"]["fpr"]
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(z * z / (30 + z * z))
    p, n = 15 / 20, 20  # recall 15 / 20, the general formula
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert block["ci95"]["recall"] == pytest.approx([centre - half, centre + half])
    assert block["ci95"]["f1"][0] < block["f1"] < block["ci95"]["f1"][1]
