"""Synthetic labelled verdicts with known detector behaviour, for the tests and
``bench/bench_eval.py``: each detector score is a noisy function of a latent label (or
of nothing, for a useless one), stored as ``modgate scan`` would store it.

    python -m worker.quality.synthetic --out DIR --count 10000
"""

from __future__ import annotations

import argparse
import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from worker.aggregator import assess
from worker.errors import ErrorCode
from worker.policy import CATEGORIES, Policy, default_policy_dict
from worker.verdict import DetectorResult, Source, Verdict, error_verdict, verdict_id


@dataclass(frozen=True)
class SyntheticScore:
    """``detector.score`` = sigmoid(offset + gain * (category in ``categories``) + noise)."""

    detector: str
    score: str
    categories: tuple[str, ...]
    gain: float
    noise: float = 1.0
    offset: float = -2.0


def default_scores() -> list[SyntheticScore]:
    """One synthetic score per evidence of the default policy: informative for the
    categories it is listed for, except ``falconsai_vit`` which is pure noise."""
    policy = Policy.model_validate(default_policy_dict())
    listed: dict[tuple[str, str], list[str]] = {}
    for name, rule in policy.categories.items():
        for e in rule.evidence:
            listed.setdefault((e.detector, e.score), []).append(name)
    out = []
    for (detector, score), cats in sorted(listed.items()):
        useless = detector == "falconsai_vit"
        out.append(SyntheticScore(detector, score, tuple(cats), gain=0.0 if useless else 3.0, noise=1.3))
    return out


def generate(
    n: int,
    seed: int = 0,
    scores: Sequence[SyntheticScore] | None = None,
    categories: Sequence[str] = CATEGORIES,
    unsafe_rate: float = 0.4,
    error_rate: float = 0.0,
    root: Path = Path("/synthetic"),
) -> tuple[list[Verdict], list[dict[str, str]]]:
    """``n`` verdicts under the default policy and their UnsafeBench-style label rows
    (``uri`` relative to ``root``, ``label``, ``category``, ``split``)."""
    scores = list(scores if scores is not None else default_scores())
    policy = Policy.model_validate(default_policy_dict())
    rng = np.random.default_rng(seed)
    unsafe = rng.random(n) < unsafe_rate
    category = np.where(unsafe, rng.choice(list(categories), size=n), "")
    split = rng.choice(["real", "ai"], size=n)
    failed = rng.random(n) < error_rate
    values = {}
    for s in scores:
        latent = np.isin(category, s.categories)
        z = s.offset + s.gain * latent + rng.normal(0.0, s.noise, n)
        values[(s.detector, s.score)] = 1.0 / (1.0 + np.exp(-z))
    detectors = sorted({s.detector for s in scores})
    verdicts, rows = [], []
    for i in range(n):
        uri = f"images/{i:06d}.jpg"
        path = os.path.join(str(root), uri)
        source = Source(kind="file", uri=path, path=path)
        rows.append(
            {
                "uri": uri,
                "label": "unsafe" if unsafe[i] else "safe",
                "category": str(category[i]),
                "split": str(split[i]),
            }
        )
        if failed[i]:
            verdicts.append(error_verdict(source, policy.version, ErrorCode.CORRUPT_IMAGE, "synthetic"))
            continue
        det_scores = {d: {} for d in detectors}
        for (d, name), v in values.items():
            det_scores[d][name] = float(v[i])
        result = assess(det_scores, policy, loaded=detectors)
        verdicts.append(
            Verdict(
                id=verdict_id(source, policy.version),
                source=source,
                status="ok",
                decision=result.decision,
                primary_category=result.primary_category,
                categories=result.categories,
                detectors={
                    d: DetectorResult(model="synthetic", revision="0", scores=sc)
                    for d, sc in det_scores.items()
                },
                frames=1,
                policy_version=policy.version,
            )
        )
    return verdicts, rows


def write(out: Path, verdicts: Sequence[Verdict], rows: Sequence[dict[str, str]]) -> tuple[Path, Path]:
    """``out/labels.csv`` and ``out/verdicts.jsonl``."""
    out.mkdir(parents=True, exist_ok=True)
    labels, stored = out / "labels.csv", out / "verdicts.jsonl"
    with labels.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["uri", "label", "category", "split"])
        writer.writeheader()
        writer.writerows(rows)
    with stored.open("w") as handle:
        for verdict in verdicts:
            handle.write(verdict.model_dump_json() + "\n")
    return labels, stored


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    verdicts, rows = generate(args.count, args.seed, root=args.out.resolve(), error_rate=0.01)
    labels, stored = write(args.out, verdicts, rows)
    print(f"{len(rows)} labels in {labels}, verdicts in {stored}")


if __name__ == "__main__":
    main()
