import math

import numpy as np
import pytest

from modgate.errors import ConfigError
from modgate.policy import CATEGORIES, Policy, deep_merge, default_policy_dict, require_detectors
from worker.detectors.base import DetectorOutput
from worker.judge.aggregator import (
    MissingEvidenceError,
    MissingScoresError,
    assess,
    category_scores,
    fuse_frames,
)


def policy(**override) -> Policy:
    return Policy.model_validate(deep_merge(default_policy_dict(), override))


def test_every_category_is_reported_and_uncovered_ones_are_not_safe():
    result = assess({"open_nsfw": {"nsfw": 0.1}}, policy(), loaded={"open_nsfw"})
    assert set(result.categories) == set(CATEGORIES)
    assert result.categories["sexual"].covered and result.categories["sexual"].score == pytest.approx(0.1)
    violence = result.categories["violence"]
    assert violence.covered is False and violence.score is None and violence.flagged is False
    assert result.decision == "safe" and result.primary_category is None


@pytest.mark.parametrize(
    ("score", "decision", "flagged", "review"),
    [
        (0.49, "safe", False, False),
        (0.5, "review", False, True),
        (0.79, "review", False, True),
        (0.8, "unsafe", True, False),
        (1.0, "unsafe", True, False),
    ],
)
def test_threshold_and_review_band_edges(score, decision, flagged, review):
    result = assess({"open_nsfw": {"nsfw": score}}, policy(), loaded={"open_nsfw"})
    sexual = result.categories["sexual"]
    assert (result.decision, sexual.flagged, sexual.review) == (decision, flagged, review)
    assert result.primary_category == (None if decision == "safe" else "sexual")


def test_drivers_name_the_detectors_behind_a_flag():
    result = assess(
        {"open_nsfw": {"nsfw": 0.95}, "nudenet": {"sexual": 0.6}},
        policy(),
        loaded={"open_nsfw", "nudenet"},
    )
    assert result.categories["sexual"].drivers == ["open_nsfw.nsfw", "nudenet.sexual"]
    low = assess(
        {"open_nsfw": {"nsfw": 0.95}, "nudenet": {"sexual": 0.1}}, policy(), {"open_nsfw", "nudenet"}
    )
    assert low.categories["sexual"].drivers == ["open_nsfw.nsfw"]


def test_uncounted_category_is_scored_but_does_not_decide():
    p = policy(categories={"sexual": {"counted": False}})
    result = assess({"open_nsfw": {"nsfw": 0.99}}, p, loaded={"open_nsfw"})
    assert result.categories["sexual"].flagged is True
    assert result.categories["sexual"].counted is False
    assert result.decision == "safe"


def test_primary_category_is_the_one_furthest_over_its_threshold():
    p = policy(
        categories={
            "violence": {
                "threshold": 0.5,
                "review": 0.3,
                "evidence": [{"detector": "x", "score": "violent"}],
            },
            "sexual": {"threshold": 0.9, "evidence": [{"detector": "x", "score": "sexual"}]},
        }
    )
    result = assess({"x": {"violent": 0.9, "sexual": 0.95}}, p, loaded={"x"})
    assert result.decision == "unsafe"
    assert result.primary_category == "violence"  # 0.4 over vs 0.05 over


def test_weights_scale_evidence_and_cap_at_one():
    p = policy(categories={"sexual": {"evidence": [{"detector": "x", "score": "s", "weight": 2.0}]}})
    assert assess({"x": {"s": 0.3}}, p, {"x"}).categories["sexual"].score == pytest.approx(0.6)
    assert assess({"x": {"s": 0.9}}, p, {"x"}).categories["sexual"].score == 1.0


def test_fuse_frames_takes_the_worst_frame():
    fused = fuse_frames(
        [
            DetectorOutput({"nsfw": 0.1, "sfw": 0.9}, {"frame": 0}),
            DetectorOutput({"nsfw": 0.7, "sfw": 0.3}, {"frame": 1}),
            DetectorOutput({"nsfw": 0.2, "sfw": 0.8}, {"frame": 2}),
        ]
    )
    assert fused.scores == {"nsfw": 0.7, "sfw": 0.9}
    assert fused.details == {"frame": 0}  # the frame holding the highest single score (sfw 0.9)


def test_policy_rejects_review_band_above_threshold():
    with pytest.raises(ValueError, match="review band"):
        policy(categories={"sexual": {"threshold": 0.5, "review": 0.6}})


def logistic(**rule) -> Policy:
    sexual = {
        "fusion": "logistic",
        "weights": {"x.a": 4.0, "y.b": 2.0, "z.c": -1.0},
        "bias": -3.0,
        "evidence": [
            {"detector": "x", "score": "a"},
            {"detector": "y", "score": "b"},
            {"detector": "z", "score": "c"},
        ],
        **rule,
    }
    return policy(categories={"sexual": sexual})


def test_logistic_fusion_is_the_fitted_formula_with_the_largest_contribution_driving():
    scores = {"x": {"a": 0.9}, "y": {"b": 0.7}, "z": {"c": 0.5}}
    result = assess(scores, logistic(), loaded={"x", "y", "z"})
    sexual = result.categories["sexual"]
    z = -3.0 + 4.0 * 0.9 + 2.0 * 0.7 - 1.0 * 0.5
    assert sexual.score == pytest.approx(1 / (1 + math.exp(-z)))
    assert sexual.flagged and result.decision == "unsafe"
    assert sexual.drivers == ["x.a", "y.b"]  # negative contributions never drive
    low = assess({"x": {"a": 0.0}, "y": {"b": 0.1}, "z": {"c": 0.9}}, logistic(), {"x", "y", "z"})
    assert low.decision == "safe" and low.categories["sexual"].drivers == []


def test_one_formula_for_one_image_and_for_many():
    rule = logistic().categories["sexual"]
    rng = np.random.default_rng(0)
    values = {k: rng.random(50) for k in ("x.a", "y.b", "z.c")}
    many = category_scores(rule, values)
    for i in range(50):
        scores = {"x": {"a": values["x.a"][i]}, "y": {"b": values["y.b"][i]}, "z": {"c": values["z.c"][i]}}
        one = assess(scores, logistic(), {"x", "y", "z"})
        assert one.categories["sexual"].score == many[i]  # bit for bit
    max_rule = policy().categories["sexual"]
    vals = {"open_nsfw.nsfw": rng.random(20), "nudenet.sexual": rng.random(20)}
    fused = category_scores(max_rule, vals)
    for i in range(20):
        scores = {
            "open_nsfw": {"nsfw": vals["open_nsfw.nsfw"][i]},
            "nudenet": {"sexual": vals["nudenet.sexual"][i]},
        }
        one = assess(scores, policy(), {"open_nsfw", "nudenet"})
        assert one.categories["sexual"].score == fused[i]


def test_logistic_without_all_its_detectors_fails_closed():
    with pytest.raises(MissingEvidenceError, match=r"sexual.*z"):
        assess({"x": {"a": 0.9}, "y": {"b": 0.1}}, logistic(), loaded={"x", "y"})
    result = assess({"x": {"a": 0.0}, "y": {"b": 0.0}}, logistic(on_missing="review"), loaded={"x", "y"})
    sexual = result.categories["sexual"]
    assert sexual.review and not sexual.covered and sexual.score is None
    assert result.decision == "review" and result.primary_category == "sexual"


def test_policy_refuses_logistic_weights_for_evidence_it_does_not_list():
    with pytest.raises(ValueError, match=r"does not list: q\.d"):
        logistic(weights={"x.a": 1.0, "q.d": 2.0})
    with pytest.raises(ValueError, match="needs `weights`"):
        logistic(weights=None)


def test_start_up_check_names_the_missing_detectors_unless_on_missing_review():
    with pytest.raises(ConfigError, match=r"category sexual .*z \(why not\)"):
        require_detectors({"policy": logistic()}, loaded={"x", "y"}, skipped={"z": "why not"})
    require_detectors({"policy": logistic(on_missing="review")}, loaded={"x"}, skipped={})
    require_detectors({"policy": logistic()}, loaded={"x", "y", "z"}, skipped={})


def test_a_loaded_detector_without_scores_is_an_error_not_a_zero():
    # nudenet ran (loaded) but has no scores for this image: sexual must not be judged on
    # open_nsfw alone as if nudenet had said 0.0.
    with pytest.raises(MissingScoresError, match="nudenet"):
        assess({"open_nsfw": {"nsfw": 0.1}}, policy(), loaded={"open_nsfw", "nudenet"})
    with pytest.raises(MissingScoresError, match="nudenet"):
        assess({"open_nsfw": {"nsfw": 0.1}, "nudenet": {}}, policy(), loaded={"open_nsfw", "nudenet"})
    # A NaN or infinite score is no score (NaN compares below every threshold: safe).
    for bad in (float("nan"), float("inf")):
        with pytest.raises(MissingScoresError, match="nudenet"):
            assess(
                {"open_nsfw": {"nsfw": 0.1}, "nudenet": {"sexual": bad}},
                policy(),
                loaded={"open_nsfw", "nudenet"},
            )
    # ... also when only one frame of an animation had it
    nan_frame = DetectorOutput(scores={"sexual": float("nan")})
    fused = fuse_frames(
        [DetectorOutput(scores={"sexual": 0.1}), nan_frame, DetectorOutput(scores={"sexual": 0.2})]
    )
    assert math.isnan(fused.scores["sexual"])
    # A loaded detector that no evidence uses may stay silent.
    unused = policy(categories={"sexual": {"evidence": [{"detector": "open_nsfw", "score": "nsfw"}]}})
    assert assess({"open_nsfw": {"nsfw": 0.1}}, unused, loaded={"open_nsfw", "nudenet"}).decision == "safe"


def _match(action, category="illegal_activity", bank="b1", kind="sha256"):
    from modgate.verdict import BankMatch

    return BankMatch(bank=bank, kind=kind, hash="ab" * 32, distance=0, category=category, action=action)


def _assessed(**scores):
    from worker.judge.aggregator import assess

    return assess({"open_nsfw": {"nsfw": scores.get("nsfw", 0.0), "sfw": 1.0}}, policy(), {"open_nsfw"})


def test_an_unsafe_bank_match_flags_its_category_above_the_detectors():
    from worker.judge.aggregator import apply_matches

    got = apply_matches(_assessed(nsfw=0.01), [_match("unsafe")])
    assert got.decision == "unsafe" and got.primary_category == "illegal_activity"
    cat = got.categories["illegal_activity"]
    assert cat.flagged and cat.covered and cat.drivers == ["bank:b1"]
    assert got.categories["sexual"].score == pytest.approx(0.01)  # the detectors' scores stay
    skipped = apply_matches(None, [_match("unsafe")])  # the models were skipped
    assert skipped.decision == "unsafe" and skipped.categories["sexual"].covered is False


def test_review_and_safe_matches_never_weaken_a_stronger_finding():
    from worker.judge.aggregator import apply_matches

    unsafe = _assessed(nsfw=0.99)
    assert unsafe.decision == "unsafe"
    assert apply_matches(unsafe, [_match("review")]).decision == "unsafe"
    assert apply_matches(unsafe, [_match("safe")]).decision == "safe"  # an allow-list overturns
    assert apply_matches(unsafe, [_match("safe"), _match("unsafe", bank="b2")]).decision == "unsafe"
    assert apply_matches(unsafe, [_match("safe"), _match("review", bank="b2")]).decision == "unsafe"
    review = apply_matches(_assessed(nsfw=0.0), [_match("review", category="violence")])
    assert review.decision == "review" and review.primary_category == "violence"
    assert review.categories["violence"].review and not review.categories["violence"].flagged
    safe = apply_matches(unsafe, [_match("safe")])
    assert safe.primary_category is None and not any(c.flagged or c.review for c in safe.categories.values())
    with pytest.raises(ValueError):
        apply_matches(None, [])


def test_the_policy_resolves_bank_actions_and_which_banks_count():
    p = Policy.model_validate(
        deep_merge(
            default_policy_dict(), {"banks": {"use": ["b1"], "overrides": {"b1": {"action": "review"}}}}
        )
    )
    assert p.banks.uses("b1") and not p.banks.uses("b2")
    assert p.banks.resolve("b1", "unsafe", "illegal_activity") == ("review", "illegal_activity")
    assert p.banks.skips_models("unsafe") and not p.banks.skips_models("safe")
    with pytest.raises(ValueError):
        Policy.model_validate(deep_merge(default_policy_dict(), {"banks": {"overides": {}}}))
