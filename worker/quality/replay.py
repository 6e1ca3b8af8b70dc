"""Stored verdicts under another policy, without running a model: ``modgate replay``.

A verdict keeps every detector's frame-fused scores, so re-aggregating them with
``worker.judge.aggregator.assess`` gives exactly what a worker running the new policy would
say. Error verdicts pass through unchanged.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from pydantic import ValidationError

from modgate.policy import CATEGORIES, CategoryPolicy, Policy, with_error_decision
from modgate.verdict import Verdict, verdict_id
from worker.judge.aggregator import apply_matches, assess
from worker.quality.labels import LabelsError

OUTCOMES = ("safe", "review", "unsafe", "error")


def read_verdicts(path: Path) -> list[Verdict]:
    """Every verdict in a JSONL file (as ``scan --output`` or the results stream writes
    them); a malformed line is a LabelsError naming it."""
    path = Path(path)
    verdicts: list[Verdict] = []
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise LabelsError(f"{path}: cannot read verdicts: {exc}") from None
    with handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                verdicts.append(Verdict.model_validate_json(line))
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first.get("loc", ()))
                raise LabelsError(
                    f"{path}:{number}: not a verdict ({first.get('msg')}{' at ' + where if where else ''})"
                ) from None
    if not verdicts:
        raise LabelsError(f"{path}: no verdicts")
    return verdicts


def check_policy(policy: Policy, verdicts: Iterable[Verdict]) -> None:
    """As the worker refuses to start, refuse to re-aggregate verdicts that lack a detector
    a logistic category (``on_missing: fail``) has weights for."""
    lacking: Counter[str] = Counter()
    for verdict in verdicts:
        if verdict.status == "ok":
            for detectors in policy.missing_detectors(verdict.detectors).values():
                lacking.update(detectors)
    if lacking:
        names = ", ".join(f"{d} (missing from {n} verdicts)" for d, n in sorted(lacking.items()))
        raise LabelsError(
            f"policy {policy.version} has logistic categories that need {names}; "
            "set `on_missing: review` on them or replay verdicts that carry those detectors"
        )


def reaggregate(verdict: Verdict, policy: Policy) -> Verdict:
    """The verdict ``policy`` gives for the same stored scores and bank matches; an error
    verdict keeps its error and takes the decision the policy's ``errors:`` rule gives its
    code (as the worker)."""
    if verdict.status != "ok":
        return with_error_decision(verdict, policy)
    if verdict.matches and not verdict.detectors:
        # The models were skipped on a bank match: nothing to re-judge but the matches.
        result = apply_matches(None, verdict.matches)
    else:
        scores = {name: d.scores for name, d in verdict.detectors.items()}
        # The stored matches apply as they are: the banks of that day, not re-matched.
        result = apply_matches(assess(scores, policy, loaded=verdict.detectors.keys()), verdict.matches)
    return verdict.model_copy(
        update={
            "id": verdict_id(verdict.source, policy.version),
            "decision": result.decision,
            "primary_category": result.primary_category,
            "categories": result.categories,
            "policy_version": policy.version,
            "created_at": datetime.now(UTC),
        }
    )


def score_table(verdicts: Sequence[Verdict]) -> dict[str, np.ndarray]:
    """Every stored score (``detector.score``) of every verdict, one pass: NaN where the
    detector did not run, 0.0 where it ran without that score (as the live aggregator)."""
    ran: dict[str, np.ndarray] = {}
    table: dict[str, np.ndarray] = {}
    for i, verdict in enumerate(verdicts):
        for name, detector in verdict.detectors.items():
            if name not in ran:
                ran[name] = np.zeros(len(verdicts), bool)
            ran[name][i] = True
            for score, value in detector.scores.items():
                key = f"{name}.{score}"
                if key not in table:
                    table[key] = np.zeros(len(verdicts))
                table[key][i] = value
    for key, values in table.items():
        values[~ran[key.partition(".")[0]]] = np.nan
    return table


def evidence_values(table: dict[str, np.ndarray], rule: CategoryPolicy) -> dict[str, np.ndarray]:
    """The columns of ``score_table`` that ``rule`` lists as evidence."""
    return {e.key: table[e.key] for e in rule.evidence if e.key in table}


@dataclass
class ReplaySummary:
    policy_before: Counter[str] = field(default_factory=Counter)
    policy_after: str = ""
    transitions: Counter[tuple[str, str]] = field(default_factory=Counter)
    flagged_before: Counter[str] = field(default_factory=Counter)
    flagged_after: Counter[str] = field(default_factory=Counter)
    ok: int = 0
    total: int = 0

    def flag_rates(self) -> dict[str, tuple[float, float]]:
        n = max(1, self.ok)
        return {c: (self.flagged_before[c] / n, self.flagged_after[c] / n) for c in CATEGORIES}

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "ok": self.ok,
            "policy_before": dict(self.policy_before),
            "policy_after": self.policy_after,
            "transitions": {f"{a}->{b}": n for (a, b), n in sorted(self.transitions.items())},
            "flag_rates": {c: {"before": b, "after": a} for c, (b, a) in self.flag_rates().items()},
        }


def _outcome(verdict: Verdict) -> str:
    return verdict.decision if verdict.status == "ok" and verdict.decision else "error"


def replay(verdicts: Sequence[Verdict], policy: Policy, out: TextIO | None = None) -> ReplaySummary:
    """Re-aggregate every verdict under ``policy``; count what changes; write the new ones."""
    check_policy(policy, verdicts)
    summary = ReplaySummary(policy_after=policy.version, total=len(verdicts))
    for verdict in verdicts:
        new = reaggregate(verdict, policy)
        summary.policy_before[verdict.policy_version] += 1
        summary.transitions[(_outcome(verdict), _outcome(new))] += 1
        if verdict.status == "ok":
            summary.ok += 1
            for name in CATEGORIES:
                before, after = verdict.categories.get(name), new.categories.get(name)
                summary.flagged_before[name] += bool(before and before.flagged)
                summary.flagged_after[name] += bool(after and after.flagged)
        if out is not None:
            out.write(new.model_dump_json() + "\n")
    return summary


def summary_json(summary: ReplaySummary) -> str:
    return json.dumps(summary.as_dict(), indent=2)
