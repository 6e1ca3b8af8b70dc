"""The moderation policy: which categories count, their thresholds, and the declarative
mapping from detector scores to the 11 UnsafeBench categories.

The default policy ships as ``policy_default.yaml`` next to this module; a deployment
overrides any part of it through its settings (YAML file or ``MODGATE_POLICY__...``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from worker.errors import ConfigError

Category = Literal[
    "hate",
    "harassment",
    "violence",
    "self_harm",
    "sexual",
    "shocking",
    "illegal_activity",
    "deception",
    "political",
    "public_health",
    "spam",
]
CATEGORIES: tuple[str, ...] = Category.__args__  # type: ignore[attr-defined]

DEFAULT_POLICY_FILE = Path(__file__).with_name("policy_default.yaml")


class Evidence(BaseModel):
    """One detector score that counts towards a category: ``weight * scores[score]``."""

    model_config = ConfigDict(extra="forbid")

    detector: str
    score: str
    weight: float = Field(1.0, gt=0.0)

    @property
    def key(self) -> str:
        """``detector.score``: how drivers and logistic weights name this evidence."""
        return f"{self.detector}.{self.score}"


class CategoryPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    counted: bool = True
    threshold: float = Field(0.8, ge=0.0, le=1.0)
    # Lower edge of the review band: scores in [review, threshold) ask for a human.
    review: float | None = Field(0.5, ge=0.0, le=1.0)
    evidence: list[Evidence] = Field(default_factory=list)
    # How evidence becomes the category score: ``max`` = weighted max (each evidence's
    # ``weight``); ``logistic`` = sigmoid(bias + sum of weights[detector.score] * score),
    # fitted by ``modgate calibrate``.
    fusion: Literal["max", "logistic"] = "max"
    weights: dict[str, float] | None = None
    bias: float | None = None
    # A logistic score without one of its inputs is meaningless: by default the worker
    # refuses to start when a weighted detector is not loaded; ``review`` sends every
    # image to review for this category instead.
    on_missing: Literal["fail", "review"] = "fail"

    @model_validator(mode="after")
    def _review_below_threshold(self) -> CategoryPolicy:
        if self.review is not None and self.review > self.threshold:
            raise ValueError(f"review band start {self.review} is above the threshold {self.threshold}")
        return self

    @model_validator(mode="after")
    def _logistic_complete(self) -> CategoryPolicy:
        if self.fusion != "logistic":
            return self
        if not self.weights or self.bias is None:
            raise ValueError("fusion: logistic needs `weights` (evidence -> weight) and `bias`")
        listed = {e.key for e in self.evidence}
        unknown = sorted(set(self.weights) - listed)
        if unknown:
            raise ValueError(
                f"logistic weights name evidence the category does not list: {', '.join(unknown)} "
                f"(listed: {', '.join(sorted(listed)) or 'none'})"
            )
        return self

    def weighted_detectors(self) -> set[str]:
        """Detectors a logistic score cannot be computed without."""
        if self.fusion != "logistic" or not self.weights:
            return set()
        return {key.partition(".")[0] for key in self.weights}


class QuarantineAction(BaseModel):
    """Move objects out of the way: copy to ``bucket``/``prefix`` + key, verify, delete."""

    model_config = ConfigDict(extra="forbid")

    bucket: str | None = None  # None = the object's own bucket
    prefix: str = "quarantine/"
    decisions: list[Literal["unsafe", "review"]] = Field(default_factory=lambda: ["unsafe"])


class PolicyActions(BaseModel):
    """Optional changes the worker makes to the moderated S3 object after publishing."""

    model_config = ConfigDict(extra="forbid")

    # Tag every moderated object with its decision (merged into its existing tags).
    tag: bool = False
    tag_key: str = "modgate-decision"
    quarantine: QuarantineAction | None = None


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str
    categories: dict[Category, CategoryPolicy]
    actions: PolicyActions = Field(default_factory=PolicyActions)

    @model_validator(mode="after")
    def _all_categories(self) -> Policy:
        missing = [c for c in CATEGORIES if c not in self.categories]
        if missing:
            raise ValueError(f"policy lacks categories: {', '.join(missing)}")
        return self

    def detectors_used(self) -> set[str]:
        return {e.detector for c in self.categories.values() for e in c.evidence}

    def missing_detectors(self, loaded: Collection[str]) -> dict[str, list[str]]:
        """Logistic categories (``on_missing: fail``) whose weighted detectors are not all
        in ``loaded``: category -> the missing detector ids. Empty = this policy can run."""
        missing: dict[str, list[str]] = {}
        for name, rule in self.categories.items():
            if rule.on_missing == "fail":
                lacking = sorted(rule.weighted_detectors() - set(loaded))
                if lacking:
                    missing[name] = lacking
        return missing


def require_detectors(
    policies: Mapping[str, Policy], loaded: Collection[str], skipped: Mapping[str, str]
) -> None:
    """Start-up check for the worker and ``scan``: a logistic category must not fail open,
    so a detector it has weights for that did not load (``skipped`` says why) stops the
    process, unless the category says ``on_missing: review``. ``policies``: name -> policy."""
    problems = []
    for name, policy in policies.items():
        for category, lacking in policy.missing_detectors(loaded).items():
            why = ", ".join(f"{d} ({skipped[d]})" if d in skipped else f"{d} (not enabled)" for d in lacking)
            problems.append(f"{name} {policy.version}: category {category} (fusion: logistic) needs {why}")
    if problems:
        raise ConfigError(
            "; ".join(problems) + ". Load those detectors, or set `on_missing: review` on the category."
        )


@cache
def _default_policy_dict() -> dict[str, Any]:
    return yaml.safe_load(DEFAULT_POLICY_FILE.read_text())


def default_policy_dict() -> dict[str, Any]:
    """A fresh deep copy of the built-in policy as plain data, ready to be merged into."""
    return deep_merge({}, _default_policy_dict())


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge ``override`` into a copy of ``base``; dicts merge key by key, anything else replaces."""
    out: dict[str, Any] = {}
    for key in base.keys() | override.keys():
        if (
            key in override
            and key in base
            and isinstance(base[key], dict)
            and isinstance(override[key], dict)
        ):
            out[key] = deep_merge(base[key], override[key])
        elif key in override:
            out[key] = override[key]
        else:
            out[key] = base[key] if not isinstance(base[key], dict) else deep_merge(base[key], {})
    return out
