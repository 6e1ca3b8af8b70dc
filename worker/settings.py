"""All configuration, in one pydantic-settings model.

Sources, strongest first: explicit overrides (CLI flags), environment variables
(``MODGATE_`` prefix, ``__`` between nested names, e.g. ``MODGATE_REDIS__URL``), an
optional YAML file (``--config`` or ``MODGATE_CONFIG``), then the defaults below.
Credentials for S3 are deliberately absent: boto3's own chain (env, profile, role)
provides them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from worker.policy import Policy, deep_merge, default_policy_dict

MiB = 1024 * 1024


class RedisSettings(BaseModel):
    url: str = "redis://127.0.0.1:6379/0"


class S3Settings(BaseModel):
    endpoint_url: str | None = None  # unset = AWS; set for MinIO, moto, Ceph...
    region: str | None = None
    max_object_bytes: int = Field(50 * MiB, gt=0)
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(30.0, gt=0)
    # botocore "standard" retries: exponential backoff with jitter on throttling and 5xx.
    max_attempts: int = Field(5, ge=1)
    max_concurrency: int = Field(32, ge=1)


class DecodeSettings(BaseModel):
    # Checked from the header before any pixel is allocated.
    max_pixels: int = Field(64_000_000, gt=0)
    # Animated images: at most this many frames, evenly spaced, are scored.
    max_frames: int = Field(8, ge=1)
    # JPEG draft mode: decode at 1/2, 1/4 or 1/8 scale when the result still covers the
    # largest input any enabled detector needs.
    draft: bool = True
    # Draft decoding stops at this multiple of the largest detector input. At 1× the
    # Open-NSFW score moves by up to 0.04 against a full decode (its JPEG re-encode
    # amplifies resampling differences); at 2× it stays below 0.01 on photos (README).
    draft_factor: float = Field(2.0, ge=1.0)
    # Detectors that are not draft-tolerant (NudeNet) switch draft decoding off while they
    # run, to stay exact. True trades that exactness for speed (deviation in the README).
    draft_always: bool = False
    workers: int = Field(2, ge=1)


class BatchSettings(BaseModel):
    max_batch: int = Field(32, ge=1)
    max_wait_ms: float = Field(10.0, ge=0)


class RuntimeSettings(BaseModel):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    # Intra-op threads for torch/onnxruntime; None lets the runtime choose.
    threads: int | None = Field(None, ge=1)


DEFAULT_DETECTORS: tuple[str, ...] = (
    "open_nsfw",
    "nudenet",
    "sd_safety_checker",
    "laion_nsfw",
    "q16",
    "multiheaded",
    "laion_violence",
    "clip_zeroshot",
    "falconsai_vit",
)


class DetectorSettings(BaseModel):
    # None = the default set, where a detector that cannot load is skipped with a
    # warning; an explicit list is strict and fails start-up instead.
    enabled: list[str] | None = None
    paths: dict[str, Path] = Field(default_factory=dict)
    model_dir: Path | None = None
    # Where explicitly enabled detectors download published weight files they cannot find.
    cache_dir: Path = Field(default_factory=lambda: Path.home() / ".cache" / "modgate")
    # The embedding space the configured CLIP backbone serves, for checkpoints whose
    # projection fingerprint is not a known one (e.g. "openai/ViT-L-14").
    backbone_space: str | None = None
    # open_clip architecture of a backbone given as a weights file (--model clip=FILE).
    backbone_arch: str = "ViT-L-14"

    @property
    def strict(self) -> bool:
        return self.enabled is not None

    def ids(self) -> list[str]:
        return list(self.enabled) if self.enabled is not None else list(DEFAULT_DETECTORS)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MODGATE_",
        env_nested_delimiter="__",
        extra="forbid",
    )

    redis: RedisSettings = Field(default_factory=RedisSettings)
    s3: S3Settings = Field(default_factory=S3Settings)
    decode: DecodeSettings = Field(default_factory=DecodeSettings)
    batch: BatchSettings = Field(default_factory=BatchSettings)
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    detectors: DetectorSettings = Field(default_factory=DetectorSettings)
    # A policy file replaces parts of the built-in policy; inline ``policy`` entries
    # (YAML config or env) are merged on top of that.
    policy_file: Path | None = None
    policy: Policy = Field(default_factory=lambda: Policy.model_validate(default_policy_dict()))

    _yaml_file: ClassVar[Path | None] = None

    @model_validator(mode="before")
    @classmethod
    def _merge_policy(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        merged = default_policy_dict()
        policy_file = data.get("policy_file")
        if policy_file:
            from_file = _read_yaml(Path(policy_file))
            merged = deep_merge(merged, from_file.get("policy", from_file))
        inline = data.get("policy")
        if isinstance(inline, dict):
            merged = deep_merge(merged, inline)
        elif isinstance(inline, Policy):
            merged = inline.model_dump()
        return {**data, "policy": merged}

    @field_validator("policy_file")
    @classmethod
    def _policy_file_exists(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError(f"policy file {v} does not exist")
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls._yaml_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=cls._yaml_file))
        return tuple(sources)


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return data


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from overrides, env, and the YAML file (``config`` or ``MODGATE_CONFIG``)."""
    path = config or (Path(os.environ["MODGATE_CONFIG"]) if os.environ.get("MODGATE_CONFIG") else None)
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    Settings._yaml_file = path
    try:
        return Settings(**overrides)
    finally:
        Settings._yaml_file = None
