"""Replay: stored verdicts under another policy, errors unchanged, what changed counted."""

import io
import json

import pytest

from modgate.policy import Policy, deep_merge, default_policy_dict
from worker.quality.labels import LabelsError
from worker.quality.replay import reaggregate, replay
from worker.quality.synthetic import generate


def policy(version, **categories) -> Policy:
    return Policy.model_validate(
        deep_merge(default_policy_dict(), {"version": version, "categories": categories})
    )


@pytest.fixture(scope="module")
def verdicts():
    return generate(400, seed=4, error_rate=0.05)[0]


def test_same_policy_changes_nothing_and_errors_pass_through(verdicts):
    same = replay(verdicts, Policy.model_validate(default_policy_dict()))
    assert all(a == b for a, b in same.transitions)
    assert same.transitions[("error", "error")] == sum(v.status == "error" for v in verdicts) > 0
    for v in verdicts:
        new = reaggregate(v, Policy.model_validate(default_policy_dict()))
        assert new.decision == v.decision and new.categories == v.categories


def test_a_stricter_threshold_moves_decisions_one_way_and_is_counted(verdicts):
    strict = policy("strict", sexual={"threshold": 0.5, "review": 0.3})
    out = io.StringIO()
    summary = replay(verdicts, strict, out)
    rank = {"safe": 0, "review": 1, "unsafe": 2, "error": 3}
    assert all(rank[b] >= rank[a] for a, b in summary.transitions)
    assert summary.transitions[("review", "unsafe")] > 0
    before, after = summary.flag_rates()["sexual"]
    assert after > before and summary.flag_rates()["hate"][0] == summary.flag_rates()["hate"][1]
    written = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(written) == len(verdicts)
    ok = [w for w in written if w["status"] == "ok"]
    assert {w["policy_version"] for w in ok} == {"strict"}
    errors = [w for w in written if w["status"] == "error"]
    assert {w["policy_version"] for w in errors} == {verdicts[0].policy_version}  # unchanged
    assert {w["id"] for w in ok}.isdisjoint({v.id for v in verdicts})  # new policy, new ids
    assert summary.as_dict()["transitions"]["review->unsafe"] == summary.transitions[("review", "unsafe")]


def test_a_logistic_policy_needing_an_absent_detector_is_refused(verdicts):
    sexual = {
        "fusion": "logistic",
        "weights": {"open_nsfw.nsfw": 2.0, "absent.x": 1.0},
        "bias": -1.0,
        "evidence": [{"detector": "open_nsfw", "score": "nsfw"}, {"detector": "absent", "score": "x"}],
    }
    with pytest.raises(LabelsError, match=r"absent \(missing from \d+ verdicts\).*on_missing: review"):
        replay(verdicts, policy("logit", sexual=sexual))
    reviewed = replay(verdicts, policy("logit", sexual={**sexual, "on_missing": "review"}))
    assert {b for (_, b) in reviewed.transitions} <= {"review", "unsafe", "error"}


def test_error_verdicts_take_the_replayed_policys_error_decision(verdicts):
    """`errors: {code: {review: true}}` in the replayed policy sends those error verdicts to
    review, exactly as the worker would decide them; other error codes keep no decision."""
    errors = [v for v in verdicts if v.status == "error"]
    code = errors[0].error.code
    strict = Policy.model_validate(
        deep_merge(default_policy_dict(), {"version": "errs", "errors": {str(code): {"review": True}}})
    )
    for v in errors:
        new = reaggregate(v, strict)
        assert new.status == "error" and new.error == v.error
        assert new.decision == ("review" if v.error.code == code else None)


def test_stored_bank_matches_apply_and_bank_only_verdicts_are_not_rejudged(verdicts):
    from modgate.verdict import BankMatch

    match = BankMatch(
        bank="takedowns", kind="sha256", hash="ab" * 32, distance=0, category="violence", action="unsafe"
    )
    ok = next(v for v in verdicts if v.status == "ok" and v.decision == "safe")
    stored = ok.model_copy(update={"matches": [match]})
    again = reaggregate(stored, policy("p2"))
    assert again.decision == "unsafe" and again.primary_category == "violence" and again.matches == [match]
    assert again.categories["violence"].drivers[0] == "bank:takedowns"
    bank_only = stored.model_copy(update={"detectors": {}})  # the models were skipped
    replayed = reaggregate(bank_only, policy("p2"))
    assert replayed.decision == "unsafe" and replayed.detectors == {} and replayed.policy_version == "p2"
