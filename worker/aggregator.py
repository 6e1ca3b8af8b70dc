"""Aggregator: fuses detector outputs over frames, maps them onto the 11 categories
through the policy's declarative evidence lists, and decides safe / review / unsafe.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from worker.detectors.base import DetectorOutput
from worker.policy import CATEGORIES, Policy
from worker.verdict import CategoryResult, Decision


def fuse_frames(outputs: Sequence[DetectorOutput]) -> DetectorOutput:
    """Max over frames for every score: an animation is as unsafe as its worst frame.
    Details come from the frame with the highest single score."""
    if len(outputs) == 1:
        return outputs[0]
    scores: dict[str, float] = {}
    for out in outputs:
        for name, value in out.scores.items():
            scores[name] = max(value, scores.get(name, value))
    worst = max(outputs, key=lambda o: max(o.scores.values(), default=0.0))
    return DetectorOutput(scores=scores, details=worst.details)


@dataclass(frozen=True)
class Assessment:
    decision: Decision
    primary_category: str | None
    categories: dict[str, CategoryResult]


def assess(scores: dict[str, dict[str, float]], policy: Policy, loaded: Collection[str]) -> Assessment:
    """``scores`` maps detector id -> its fused scores; ``loaded`` are the detectors that
    ran, which decides coverage (a category nobody looks at is not reported safe)."""
    categories: dict[str, CategoryResult] = {}
    unsafe: list[tuple[float, str]] = []
    review: list[tuple[float, str]] = []
    for name in CATEGORIES:
        rule = policy.categories[name]  # type: ignore[index]
        evidence = [e for e in rule.evidence if e.detector in loaded]
        if not evidence:
            categories[name] = CategoryResult(score=None, flagged=False, covered=False, counted=rule.counted)
            continue
        weighted = {
            f"{e.detector}.{e.score}": min(1.0, e.weight * scores.get(e.detector, {}).get(e.score, 0.0))
            for e in evidence
        }
        score = max(weighted.values())
        band_start = rule.review if rule.review is not None else rule.threshold
        flagged = score >= rule.threshold
        in_review = not flagged and rule.review is not None and score >= rule.review
        drivers = sorted((k for k, v in weighted.items() if v >= band_start), key=lambda k: -weighted[k])
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
