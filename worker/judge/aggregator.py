"""Aggregator: fuses detector outputs over frames, maps them onto the 11 categories
through the policy's declarative evidence lists (weighted max, or a fitted logistic
formula evaluated here with numpy), and decides safe / review / unsafe.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from modgate.policy import CATEGORIES, CategoryPolicy, Policy
from modgate.verdict import BankMatch, CategoryResult, Decision
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


_BANK_RANK = {"safe": 0, "review": 1, "unsafe": 2}


def resolve_matches(found: Iterable[Any], policy: Policy) -> list[BankMatch]:
    """What raw hash-bank matches (``bank``, ``kind``, ``hash``, ``distance``, ``category``,
    ``action``, optional ``allow_pdq``) mean under ``policy``: banks it does not use are
    dropped, its overrides applied. A near (PDQ) match never allow-lists an image unless its
    bank says ``allow_pdq``: crafted PDQ collisions are published, exact hashes are not."""
    out: list[BankMatch] = []
    for m in found:
        if not policy.banks.uses(m.bank):
            continue
        action, category = policy.banks.resolve(m.bank, m.action, m.category)
        if action == "safe" and m.kind == "pdq" and not getattr(m, "allow_pdq", False):
            continue
        out.append(
            BankMatch(
                bank=m.bank, kind=m.kind, hash=m.hash, distance=m.distance, category=category, action=action
            )
        )
    return out


def decisive(matches: Sequence[BankMatch], policy: Policy, final: bool = True) -> bool:
    """True when the strongest match makes running the models pointless under ``policy``
    (``banks.skip_models_on_match``). Before the PDQ stage (``final=False``) only an unsafe
    match can be: a weaker one could still be outranked by a PDQ match after decode."""
    if not matches:
        return False
    top = max(matches, key=lambda m: _BANK_RANK[m.action])
    return (final or top.action == "unsafe") and policy.banks.skips_models(top.action)


def apply_matches(assessment: Assessment | None, matches: Sequence[BankMatch]) -> Assessment:
    """Hash-bank matches over the detectors' assessment (None when a decisive match skipped
    the models). The strongest action wins and no match weakens another or the detectors:
    ``unsafe`` flags its category (its drivers name ``bank:<name>``) and makes the verdict
    unsafe; ``review`` makes a verdict that is not unsafe ``review``; ``safe`` (an
    allow-list) makes it safe only when no ``unsafe`` or ``review`` bank matched.
    ``matches`` carry the action and category the policy resolved for them."""
    if not matches:
        if assessment is None:
            raise ValueError("no assessment and no bank match to judge by")
        return assessment
    categories = (
        dict(assessment.categories)
        if assessment is not None
        else {name: CategoryResult(score=None, flagged=False, covered=False) for name in CATEGORIES}
    )
    top = max(_BANK_RANK[m.action] for m in matches)
    if top == _BANK_RANK["safe"]:
        cleared = {n: c.model_copy(update={"flagged": False, "review": False}) for n, c in categories.items()}
        return Assessment(decision="safe", primary_category=None, categories=cleared)
    banked: list[str] = []
    for match in sorted(matches, key=lambda m: -_BANK_RANK[m.action]):
        if _BANK_RANK[match.action] != top or match.category not in categories:
            continue
        old = categories[match.category]
        flagged = old.flagged or match.action == "unsafe"
        driver = f"bank:{match.bank}"
        categories[match.category] = old.model_copy(
            update={
                "flagged": flagged,
                "review": not flagged,
                "covered": True,
                "drivers": [driver, *(d for d in old.drivers if d != driver)],
            }
        )
        banked.append(match.category)
    if top == _BANK_RANK["unsafe"]:
        primary = banked[0] if banked else assessment.primary_category if assessment else None
        return Assessment(decision="unsafe", primary_category=primary, categories=categories)
    if assessment is not None and assessment.decision == "unsafe":
        return Assessment("unsafe", assessment.primary_category, categories)
    primary = banked[0] if banked else assessment.primary_category if assessment else None
    return Assessment(decision="review", primary_category=primary, categories=categories)
