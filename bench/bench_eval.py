"""``modgate eval`` speed on stored verdicts, and the held-out quality of calibration.

(a) Generate 10,000 synthetic labelled verdicts (every evidence score of the default
    policy, 1 % error verdicts) and time ``modgate eval LABELS --verdicts V --out DIR``
    as a user runs it: a fresh process, default bootstrap (1,000 resamples), plots and
    HTML included. Wall time and the process's CPU time (user + sys) are both reported:
    on a shared machine the CPU time is what the command itself needs.
(b) The synthetic detectors of worker/quality/synthetic.py (two noisy views of a
    latent label, one useless score), fitted on 3,000 images and judged on 3,000 others:
    held-out F1 of the best single detector, the default policy, calibrated max and
    calibrated logistic fusion; the share of positives flagged or in review (--review-recall
    0.95) on the fitting half and on the held-out half.

    python bench/bench_eval.py [--count 10000] [--out bench/results/eval.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def time_eval(count: int, work: Path) -> dict[str, float]:
    from worker.quality.synthetic import generate, write

    verdicts, rows = generate(count, seed=0, root=work.resolve(), error_rate=0.01)
    labels, stored = write(work, verdicts, rows)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "worker.cli", "eval", str(labels), "--verdicts", str(stored), "--out",
         str(work / "report")],
        check=True, capture_output=True, cwd=ROOT,
    )  # fmt: skip
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    report = json.loads((work / "report" / "report.json").read_text())
    return {"verdicts": count, "labelled_ok": report["n"], "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "load_avg_1m_before": round(load, 2), "bootstrap": report["bootstrap"]["resamples"]}  # fmt: skip


def held_out_quality() -> dict[str, float]:
    from worker.quality.calibrate import Target, calibrate
    from worker.quality.synthetic import CALIBRATION_SCORES, base_policy, calibration_halves, held_out
    from worker.quality.synthetic import single_detector_f1 as single

    # The same 6,000 verdicts as tests/unit/test_quality_calibrate.py: 3,000 fit, 3,000 held out.
    train, test = calibration_halves(6000, seed=11)
    singles = {
        f"{s.detector}.{s.score}": single(train, test, s.detector, s.score) for s in CALIBRATION_SCORES
    }
    fpr_policy = calibrate(train, base_policy(), Target.parse("fpr=0.01"), "logistic").policy
    f1_policy = calibrate(train, base_policy(), Target("f1"), "logistic", review_recall=0.95).policy
    return {
        "best_single_detector_f1": round(max(singles.values()), 4),
        "single_detector_f1": {k: round(v, 4) for k, v in singles.items()},
        "default_policy_f1": round(held_out(base_policy(), test)[0], 4),
        "calibrated_max_f1": round(
            held_out(calibrate(train, base_policy(), Target("f1"), "max").policy, test)[0], 4
        ),
        "calibrated_logistic_f1": round(held_out(f1_policy, test)[0], 4),
        "logistic_fpr_target_0.01_held_out_fpr": round(float(held_out(fpr_policy, test)[1]), 4),
        # --review-recall 0.95: met on the fitting half by construction; the held-out half says
        # what to expect on new images.
        "logistic_review_recall_0.95_fitting": round(review_recall(f1_policy, train), 4),
        "logistic_review_recall_0.95_held_out": round(review_recall(f1_policy, test), 4),
    }


def review_recall(policy, joined) -> float:
    """Share of the sexual positives flagged or sent to review under ``policy``."""
    from worker.quality.replay import reaggregate

    y = joined.truth("sexual") == 1
    cats = [reaggregate(v, policy).categories["sexual"] for v in joined.verdicts]
    seen = [c.flagged or c.review for c in cats]
    return sum(s for s, positive in zip(seen, y, strict=True) if positive) / int(y.sum())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "eval.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        speed = time_eval(args.count, Path(tmp))
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "eval": speed,
        "held_out": held_out_quality(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
