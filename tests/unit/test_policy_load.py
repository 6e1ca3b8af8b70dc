"""Policy and settings files fail loudly: unknown detectors and score names in evidence,
YAML syntax errors and out-of-range values are refused at load, naming file and line."""

import pytest

from modgate.detector_scores import DECLARED_SCORES
from modgate.errors import ErrorCode, PolicyError
from modgate.policy import Policy, default_policy_dict
from modgate.settings import load_settings

POLICY = """\
version: typo-1
categories:
  sexual:
    threshold: 0.9
    evidence:
      - {detector: open_nsfw, score: nsfw}
      - {detector: DETECTOR, score: SCORE}
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("MODGATE_CONFIG", "MODGATE_POLICY_FILE", "MODGATE_POLICIES"):
        monkeypatch.delenv(var, raising=False)


def write_policy(tmp_path, detector="nudenet", score="sexual"):
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY.replace("DETECTOR", detector).replace("SCORE", score))
    return path


def test_the_declared_scores_are_what_the_detectors_emit():
    from worker.detectors import REGISTRY
    from worker.detectors.clip_heads import SCORE_NAMES
    from worker.detectors.clip_zeroshot import CATEGORY_IDS
    from worker.detectors.nudenet import LABELS

    assert set(DECLARED_SCORES) == set(REGISTRY)
    assert DECLARED_SCORES["nudenet"] == {*LABELS, "sexual"}
    for head, names in SCORE_NAMES.items():
        assert DECLARED_SCORES[head] == set(names)
    assert DECLARED_SCORES["clip_zeroshot"] == {*CATEGORY_IDS.values(), "safe"}


def test_a_known_detector_and_score_load(tmp_path):
    policy = load_settings(policy_file=write_policy(tmp_path)).policy
    assert [e.key for e in policy.categories["sexual"].evidence] == ["open_nsfw.nsfw", "nudenet.sexual"]


@pytest.mark.parametrize(
    ("detector", "score", "expected"),
    [
        ("open_nsf", "nsfw", "policy.yaml:7: unknown detector 'open_nsf' (known: clip_zeroshot, "),
        ("open_nsfw", "nsf", "policy.yaml:7: unknown score 'nsf' of detector open_nsfw (known: nsfw, sfw)"),
    ],
)
def test_a_typo_in_evidence_is_refused_with_file_and_line(tmp_path, detector, score, expected):
    path = write_policy(tmp_path, detector, score)
    with pytest.raises(PolicyError) as caught:
        load_settings(policy_file=path)
    assert f"{tmp_path}/{expected}" in str(caught.value)
    assert "categories.sexual.evidence[1]" in str(caught.value)


def test_out_of_range_values_name_their_line(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("version: x\ncategories:\n  sexual:\n    threshold: 1.5\n")
    with pytest.raises(PolicyError, match=r"policy\.yaml:4: .*less than or equal to 1"):
        load_settings(policy_file=path)


@pytest.mark.parametrize("which", ["policy", "config"])
def test_yaml_syntax_errors_name_file_and_line(tmp_path, which):
    path = tmp_path / f"{which}.yaml"
    path.write_text("version: x\ncategories:\n  sexual: {threshold: 0.9\n  hate: {}\n")
    with pytest.raises(PolicyError, match=rf"{which}\.yaml:\d+: YAML syntax error"):
        if which == "policy":
            load_settings(policy_file=path)
        else:
            load_settings(path)


def test_an_inline_policy_in_the_config_file_names_the_config_line(tmp_path):
    cfg = tmp_path / "modgate.yaml"
    cfg.write_text(
        "batch: {max_batch: 4}\npolicy:\n  categories:\n    violence:\n"
        "      evidence: [{detector: q16, score: inapropriate}]\n"
    )
    with pytest.raises(PolicyError, match=r"modgate\.yaml:5: unknown score 'inapropriate' of detector q16"):
        load_settings(cfg)


def test_env_overlays_are_checked_the_same_way(monkeypatch):
    monkeypatch.setenv(
        "MODGATE_POLICY__CATEGORIES__SEXUAL__EVIDENCE", '[{"detector": "open_nsf", "score": "nsfw"}]'
    )
    with pytest.raises(PolicyError, match=r"MODGATE_POLICY__.*unknown detector 'open_nsf'"):
        load_settings()
    monkeypatch.delenv("MODGATE_POLICY__CATEGORIES__SEXUAL__EVIDENCE")
    monkeypatch.setenv(
        "MODGATE_POLICIES",
        '{"strict": {"categories": {"sexual": {"evidence": [{"detector": "nudenet", "score": "sex"}]}}}}',
    )
    with pytest.raises(PolicyError, match=r"policies\.strict .*unknown score 'sex' of detector nudenet"):
        load_settings()


def test_named_overlays_in_the_config_file_name_their_line(tmp_path):
    cfg = tmp_path / "modgate.yaml"
    cfg.write_text("policies:\n  strict:\n    errors:\n      timout: {action: quarantine}\n")
    with pytest.raises(PolicyError, match=r"modgate\.yaml:3: unknown error code\(s\) timout"):
        load_settings(cfg)


def test_error_rules_resolve_code_then_all_then_tag():
    policy = Policy.model_validate(
        {
            **default_policy_dict(),
            "errors": {
                "all": {"review": True},
                "timeout": {"action": "quarantine"},
                "not_found": {"review": False},
            },
        }
    )
    assert (policy.error_rule(ErrorCode.TIMEOUT).action, policy.error_rule("timeout").review) == (
        "quarantine",
        True,
    )
    assert policy.error_rule(ErrorCode.CORRUPT_IMAGE).action == "tag"
    assert policy.error_decision(ErrorCode.CORRUPT_IMAGE) == "review"
    assert policy.error_decision(ErrorCode.NOT_FOUND) is None
    bare = Policy.model_validate(default_policy_dict())
    assert bare.error_rule("image_too_complex").action == "tag" and bare.error_decision("timeout") is None


def test_a_policy_that_is_not_a_mapping_is_refused(tmp_path):
    cfg = tmp_path / "modgate.yaml"
    cfg.write_text("policy: strict\n")
    with pytest.raises(PolicyError, match="expected a mapping"):
        load_settings(cfg)
