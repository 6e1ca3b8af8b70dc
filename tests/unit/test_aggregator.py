import pytest

from worker.aggregator import assess, fuse_frames
from worker.detectors.base import DetectorOutput
from worker.policy import CATEGORIES, Policy, deep_merge, default_policy_dict


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
