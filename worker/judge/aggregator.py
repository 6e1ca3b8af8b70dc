"""Aggregator: fuses detector outputs over frames, maps them onto the 11 categories
through the policy's declarative evidence lists (weighted max, or a fitted logistic
formula evaluated here with numpy), and decides safe / review / unsafe.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from modgate.policy import CATEGORIES, CategoryPolicy, Policy
from modgate.verdict import CategoryResult, Decision
from worker.detectors.base import DetectorOutput


class MissingEvidenceError(ValueError):
    """A logistic category (``on_missing: fail``) lacks a detector it has weights for."""


class MissingScoresError(ValueError):
    """A loaded detector that the policy's evidence uses returned no score (or a NaN or
    infinite one) for this image: the image's verdict is a ``detector_failed`` error, never
    a silent zero (a NaN compares below every threshold, so it would read as safe)."""

    def __init__(self, detectors: Collection[str]) -> None:
        self.detectors = sorted(detectors)
        super().__init__(f"no score from loaded detector(s) {', '.join(self.detectors)}")


def check_scores(scores: Mapping[str, Mapping[str, float]], policy: Policy, loaded: Collection[str]) -> None:
    """Raise ``MissingScoresError`` when a detector in ``loaded`` that some category's evidence
    names has no scores at all, or a non-finite one: treating it as 0.0 would fail open."""
    used = {e.detector for rule in policy.categories.values() for e in rule.evidence}
    silent = {
        d
        for d in used.intersection(loaded)
        if not scores.get(d) or not all(math.isfinite(v) for v in scores[d].values())
    }
    if silent:
        raise MissingScoresError(silent)


def fuse_frames(outputs: Sequence[DetectorOutput]) -> DetectorOutput:
    """Max over frames for every score: an animation is as unsafe as its worst frame.
    Details come from the frame with the highest single score."""
    if len(outputs) == 1:
        return outputs[0]
    scores: dict[str, float] = {}
    for out in outputs:
        for name, value in out.scores.items():
            prev = scores.get(name, value)
            # a NaN frame stays NaN (max() would drop it by order), so the check above sees it
            scores[name] = value if math.isnan(value) or value > prev else prev
    worst = max(outputs, key=lambda o: max(o.scores.values(), default=0.0))
    return DetectorOutput(scores=scores, details=worst.details)


@dataclass(frozen=True)
class Assessment:
    decision: Decision
    primary_category: str | None
    categories: dict[str, CategoryResult]


# One image (float) or many (numpy array): the same operations either way.
Values = float | np.ndarray


def contributions(rule: CategoryPolicy, values: Mapping[str, Values]) -> dict[str, Values]:
    """What each evidence adds to the category score. ``values`` maps ``detector.score`` ->
    that score (only evidence of loaded detectors; 0.0 where a loaded detector did not emit
    the score). Max fusion: ``min(1, weight * score)``; logistic: ``weight * score``."""
    if rule.fusion == "logistic":
        return {key: w * values[key] for key, w in (rule.weights or {}).items()}
    # Python's min/max on one image's floats round exactly as numpy's do on arrays (and
    # cost a tenth): the worker runs this for every image and category.
    cap = np.minimum if any(isinstance(v, np.ndarray) for v in values.values()) else min
    return {e.key: cap(1.0, e.weight * values[e.key]) for e in rule.evidence if e.key in values}


def _fuse(rule: CategoryPolicy, terms: Mapping[str, Values]) -> Values:
    if rule.fusion == "logistic":
        z: Values = float(rule.bias or 0.0)
        for term in terms.values():  # a fixed summation order: identical for 1 image or 10,000
            z = z + term
        return 1.0 / (1.0 + np.exp(-np.clip(z, -500.0, 500.0)))
    if any(isinstance(t, np.ndarray) for t in terms.values()):
        return functools.reduce(np.maximum, terms.values())
    return max(terms.values())


def category_scores(rule: CategoryPolicy, values: Mapping[str, Values]) -> Values:
    """The fused category score: the one formula that the worker, ``scan``, ``replay``,
    ``eval`` and ``calibrate`` all evaluate, so they cannot disagree."""
    return _fuse(rule, contributions(rule, values))


def assess(scores: dict[str, dict[str, float]], policy: Policy, loaded: Collection[str]) -> Assessment:
    """``scores`` maps detector id -> its fused scores; ``loaded`` are the detectors that
    ran, which decides coverage (a category nobody looks at is not reported safe). A loaded
    detector the evidence uses must have scores (``MissingScoresError``); a score name it
    did not emit counts as 0.0 (load-time checks refuse names no detector declares)."""
    loaded = set(loaded)
    check_scores(scores, policy, loaded)
    categories: dict[str, CategoryResult] = {}
    unsafe: list[tuple[float, str]] = []
    review: list[tuple[float, str]] = []
    for name in CATEGORIES:
        rule = policy.categories[name]  # type: ignore[index]
        lacking = rule.weighted_detectors() - loaded
        if lacking:
            if rule.on_missing != "review":
                raise MissingEvidenceError(
                    f"category {name}: logistic fusion needs detector(s) {', '.join(sorted(lacking))}"
                )
            # Without all its inputs a fitted score means nothing: a human decides.
            categories[name] = CategoryResult(
                score=None, flagged=False, review=True, covered=False, counted=rule.counted
            )
            if rule.counted:
                review.append((0.0, name))
            continue
        evidence = [e for e in rule.evidence if e.detector in loaded]
        if not evidence:
            categories[name] = CategoryResult(score=None, flagged=False, covered=False, counted=rule.counted)
            continue
        values = {e.key: scores.get(e.detector, {}).get(e.score, 0.0) for e in evidence}
        raw = contributions(rule, values)
        score = float(_fuse(rule, raw))
        terms = {k: float(v) for k, v in raw.items()}
        band_start = rule.review if rule.review is not None else rule.threshold
        flagged = score >= rule.threshold
        in_review = not flagged and rule.review is not None and score >= rule.review
        if rule.fusion == "logistic":
            # The evidence that pushed the score up most, once the score is worth a look.
            keep = [k for k, v in terms.items() if v > 0] if score >= band_start else []
        else:
            keep = [k for k, v in terms.items() if v >= band_start]
        drivers = sorted(keep, key=lambda k: -terms[k])
        categories[name] = CategoryResult(
            score=score,
            flagged=flagged,
            review=in_review,
            covered=True,
            counted=rule.counted,
            drivers=drivers,
        )
        if rule.counted and flagged:
            unsafe.append((score - rule.threshold, name))
        elif rule.counted and in_review:
            review.append((score - band_start, name))

    if unsafe:
        decision: Decision = "unsafe"
        primary: str | None = max(unsafe)[1]
    elif review:
        decision, primary = "review", max(review)[1]
    else:
        decision, primary = "safe", None
    return Assessment(decision=decision, primary_category=primary, categories=categories)
