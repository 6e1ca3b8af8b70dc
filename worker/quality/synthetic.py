"""Synthetic labelled verdicts with known detector behaviour, for the tests and
``bench/bench_eval.py``: each detector score is a noisy function of a latent label (or
of nothing, for a useless one), stored as ``modgate scan`` would store it. The
calibration helpers below (``CALIBRATION_SCORES`` … ``single_detector_f1``) are shared by
tests/unit/test_quality_calibrate.py and the bench, so both judge the same setup.

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

from modgate.errors import ErrorCode
from modgate.policy import CATEGORIES, Policy, default_policy_dict
from modgate.verdict import DetectorResult, Source, Verdict, error_verdict, verdict_id
from worker.judge.aggregator import assess
from worker.quality.labels import Joined, LabelRow, LabelSet, join


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


# -- calibration on synthetic detectors (tests and bench/bench_eval.py) ------------------

# Two noisy views of a latent "sexual" label and one useless score.
CALIBRATION_SCORES = [
    SyntheticScore("open_nsfw", "nsfw", ("sexual",), gain=3.0, noise=1.3),
    SyntheticScore("nudenet", "sexual", ("sexual",), gain=3.0, noise=1.3),
    SyntheticScore("falconsai_vit", "nsfw", ("sexual",), gain=0.0, noise=1.3, offset=0.0),
]


def base_policy() -> Policy:
    return Policy.model_validate(default_policy_dict())


def calibration_halves(n: int = 6000, seed: int = 11) -> tuple[Joined, Joined]:
    """``n`` labelled verdicts of ``CALIBRATION_SCORES`` (30 % unsafe, all "sexual"), joined
    to their labels and split in two halves: one to fit on, one held out."""
    verdicts, rows = generate(n, seed=seed, scores=CALIBRATION_SCORES, categories=["sexual"], unsafe_rate=0.3)

    def joined(part: slice) -> Joined:
        labels = [
            LabelRow(
                uri=r["uri"],
                key=str(Path("/synthetic") / r["uri"]),
                unsafe=r["label"] == "unsafe",
                truth={c: int(c == r["category"]) for c in CATEGORIES},
                split=r["split"],
                line=0,
            )
            for r in rows[part]
        ]
        return join(LabelSet(labels, "unsafebench"), verdicts[part])

    return joined(slice(0, n // 2)), joined(slice(n // 2, n))


def held_out(policy: Policy, test: Joined) -> tuple[float, float]:
    """(F1, FPR) of the sexual category's flag on the held-out half, by scikit-learn (an
    implementation independent of ours)."""
    # Imported here: scikit-learn is the eval extra, and generate() must not need it.
    from sklearn.metrics import f1_score

    from worker.quality.replay import reaggregate

    y = test.truth("sexual").astype(bool)
    flagged = np.array([reaggregate(v, policy).categories["sexual"].flagged for v in test.verdicts])
    return float(f1_score(y, flagged)), float(flagged[~y].mean())


def single_detector_f1(train: Joined, test: Joined, detector: str, score: str) -> float:
    """Held-out F1 of one score alone, its threshold fitted for F1 on ``train``."""
    from sklearn.metrics import f1_score

    from worker.quality.calibrate import Target, fit_threshold

    values = [np.array([v.detectors[detector].scores[score] for v in j.verdicts]) for j in (train, test)]
    threshold, _ = fit_threshold(train.truth("sexual").astype(bool), values[0], Target("f1"))
    return float(f1_score(test.truth("sexual").astype(bool), values[1] >= threshold))


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
