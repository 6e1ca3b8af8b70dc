import pytest
from pydantic import ValidationError

from modgate.settings import DEFAULT_DETECTORS, load_settings


def test_defaults_match_the_contract(monkeypatch):
    for var in ("MODGATE_REDIS__URL", "MODGATE_S3__ENDPOINT_URL", "MODGATE_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    s = load_settings()
    assert s.redis.url == "redis://127.0.0.1:6379/0"
    assert s.s3.endpoint_url is None
    assert s.detectors.ids() == list(DEFAULT_DETECTORS)
    assert s.detectors.strict is False


def test_env_names_from_the_contract(monkeypatch, tmp_path):
    monkeypatch.setenv("MODGATE_REDIS__URL", "redis://redis:6379/2")
    monkeypatch.setenv("MODGATE_S3__ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("MODGATE_DETECTORS__ENABLED", '["open_nsfw"]')
    monkeypatch.setenv("MODGATE_DETECTORS__PATHS", f'{{"open_nsfw": "{tmp_path}"}}')
    monkeypatch.setenv("MODGATE_BATCH__MAX_BATCH", "64")
    s = load_settings()
    assert s.redis.url == "redis://redis:6379/2"
    assert s.s3.endpoint_url == "http://minio:9000"
    assert s.detectors.ids() == ["open_nsfw"] and s.detectors.strict
    assert s.detectors.paths["open_nsfw"] == tmp_path
    assert s.batch.max_batch == 64


def test_yaml_file_then_env_then_overrides(monkeypatch, tmp_path):
    cfg = tmp_path / "modgate.yaml"
    cfg.write_text(
        "batch: {max_batch: 16, max_wait_ms: 3}\n"
        "decode: {max_frames: 4}\n"
        "policy: {version: custom-1, categories: {sexual: {threshold: 0.9}}}\n"
    )
    monkeypatch.setenv("MODGATE_BATCH__MAX_BATCH", "48")
    s = load_settings(cfg, decode={"max_frames": 2})
    assert s.batch.max_batch == 48  # env beats the file
    assert s.batch.max_wait_ms == 3  # file beats defaults
    assert s.decode.max_frames == 2  # explicit overrides beat everything
    assert s.policy.version == "custom-1"
    sexual = s.policy.categories["sexual"]
    assert sexual.threshold == 0.9
    assert [e.detector for e in sexual.evidence][:2] == ["open_nsfw", "nudenet"]  # merged, not replaced


def test_policy_file_and_env_override(monkeypatch, tmp_path):
    pol = tmp_path / "policy.yaml"
    pol.write_text("version: strict-2\ncategories:\n  political: {counted: false}\n")
    monkeypatch.setenv("MODGATE_POLICY_FILE", str(pol))
    monkeypatch.setenv("MODGATE_POLICY__CATEGORIES__SEXUAL__REVIEW", "0.3")
    s = load_settings()
    assert s.policy.version == "strict-2"
    assert s.policy.categories["political"].counted is False
    assert s.policy.categories["sexual"].review == 0.3


def test_bad_values_are_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("MODGATE_BATCH__MAX_BATCH", "0")
    with pytest.raises(ValidationError):
        load_settings()
    monkeypatch.delenv("MODGATE_BATCH__MAX_BATCH")
    with pytest.raises(ValidationError):
        load_settings(nonsense={"x": 1})
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "missing.yaml")
