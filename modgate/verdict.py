"""Verdict schema v1: what modgate says about one image, as published everywhere.

The same JSON goes to ``--output`` of ``modgate scan``, to the results stream and to
webhooks. ``modgate schema`` prints its JSON Schema.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from modgate.errors import ErrorCode

SCHEMA_VERSION = "1"
# The additions within v1 (new optional fields only: every v1 reader still reads a verdict):
# 1.1 added ``hashes``, ``matches`` and ``cached_from``; 1.2 ``hashes.pdq_file`` and
# ``hashes.pdq_file_quality``.
SCHEMA_REVISION = "1.2"

Decision = Literal["safe", "review", "unsafe"]


class Source(BaseModel):
    """Where the image came from. S3 objects carry bucket/key; local files path/sha256;
    ``message`` marks the error record of a queue message that broke the contract."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["s3", "file", "message"]
    uri: str
    bucket: str | None = None
    key: str | None = None
    version_id: str | None = None
    etag: str | None = None
    path: str | None = None
    sha256: str | None = None
    size: int | None = None

    def identity(self) -> str:
        """The part of the source that names one immutable image."""
        if self.kind == "s3":
            revision = self.version_id or (self.etag or "").strip('"')
            return f"s3\x00{self.bucket}\x00{self.key}\x00{revision}"
        if self.kind == "message":
            return f"message\x00{self.uri}\x00{self.bucket}\x00{self.key}"
        # A local file is named by its content: the same bytes under another name are the same image.
        return f"file\x00{self.sha256 or self.path}"


def verdict_id(source: Source, policy_version: str) -> str:
    """Stable id: the same object version judged under the same policy gets the same id."""
    digest = hashlib.sha256(f"{source.identity()}\x00{policy_version}".encode()).hexdigest()
    return digest[:32]


class ErrorInfo(BaseModel):
    code: ErrorCode
    message: str


class CategoryResult(BaseModel):
    # None when no enabled detector covers the category.
    score: float | None
    flagged: bool
    review: bool = False
    covered: bool
    # False when the policy does not count this category towards the decision.
    counted: bool = True
    # Detector score names (``detector.score``) at or above the review band start.
    drivers: list[str] = Field(default_factory=list)


class DetectorResult(BaseModel):
    model: str
    revision: str
    # Every score the detector computes, fused over frames by max.
    scores: dict[str, float]
    # Detector-specific detail (e.g. NudeNet boxes), from the frame with the highest score.
    details: dict[str, Any] | None = None


class ImageInfo(BaseModel):
    format: str
    width: int
    height: int
    # Frames in the file; ``Verdict.frames`` counts the ones that were scored.
    frame_count: int


class Hashes(BaseModel):
    """Hashes of the image, as hash lists share them (the SHA-256 of the bytes is ``source.sha256``)."""

    pdq: str | None = Field(
        None, description="PDQ of the first frame: 64 lowercase hex digits, as ThreatExchange writes it"
    )
    pdq_quality: int | None = Field(None, description="PDQ quality 0-100; below 50 the hash is not matched")
    md5: str | None = Field(None, description="MD5 of the original bytes, hex")
    # Added in schema v1.2 (additive).
    pdq_file: str | None = Field(
        None,
        description="Added in schema v1.2 (additive). PDQ of the first frame's pixels as stored in the "
        "file, before its EXIF orientation: what ThreatExchange and HMA compute for the file (64 "
        "lowercase hex digits). Present only when the EXIF orientation is not 1 (then `pdq` is of the "
        "image as displayed); hash banks are matched on both.",
    )
    pdq_file_quality: int | None = Field(
        None, description="Added in schema v1.2 (additive). Quality 0-100 of `pdq_file`; below 50 unmatched."
    )


class BankMatch(BaseModel):
    """A hash of this image found in a hash bank."""

    bank: str
    kind: Literal["pdq", "md5", "sha256"]
    hash: str = Field(description="the bank's hash that matched")
    distance: int = Field(description="Hamming distance for PDQ; 0 for exact kinds")
    category: str | None = None
    action: Literal["unsafe", "review", "safe"]


class Verdict(BaseModel):
    """One image, one verdict. ``status=error`` verdicts have ``decision=null``, or
    ``review`` where the policy's ``errors`` rule for their code says ``review: true``."""

    schema_version: Literal["1"] = SCHEMA_VERSION
    id: str
    source: Source
    status: Literal["ok", "error"]
    error: ErrorInfo | None = None
    decision: Decision | None = Field(
        None,
        description="safe, review or unsafe on an ok verdict. On an error verdict null, or review "
        "where the policy's errors rule for its code says `review: true` (additive in schema v1).",
    )
    primary_category: str | None = None
    categories: dict[str, CategoryResult] = Field(default_factory=dict)
    detectors: dict[str, DetectorResult] = Field(default_factory=dict)
    image: ImageInfo | None = None
    frames: int = 0
    timings_ms: dict[str, float] = Field(default_factory=dict)
    # Deprecated, always null on the stream and in webhooks: S3 actions run only after the
    # verdict is published, so their outcome is recorded apart (``worker.delivery.actions.outcome``).
    actions: dict[str, Any] | None = Field(
        None,
        description="Deprecated: always null since S3 actions run after publishing; "
        "see policy_actions, and the outcome recorded by verdict id (worker.delivery.actions.outcome).",
    )
    # Added to schema v1 (additive): the S3 actions the policy calls for on this object.
    policy_actions: dict[str, Any] | None = Field(
        None,
        description="Added in schema v1 (additive). The S3 actions the policy calls for on this "
        'object, e.g. {"tag": {"modgate-decision": "unsafe"}, "quarantine_to": "s3://q/held/k"}; '
        'on an error verdict {"tag": {"modgate-decision": "error"}} by default (the policy\'s errors '
        'rules), or {"skip": "<code>: why"} when there is no object of ours to act on; '
        "they run after the verdict is on the stream. What they did is recorded by verdict id "
        "(worker.delivery.actions.outcome), not in the verdict.",
    )
    # Added in schema v1.1 (additive).
    hashes: Hashes | None = Field(
        None, description="Added in schema v1.1 (additive). PDQ and MD5 of the image."
    )
    matches: list[BankMatch] = Field(
        default_factory=list,
        description="Added in schema v1.1 (additive). Hash-bank matches; a bank's action applies before "
        "detector evidence (the drivers of a flagged category name the bank as `bank:<name>`).",
    )
    cached_from: str | None = Field(
        None,
        description="Added in schema v1.1 (additive). The verdict id whose detector scores this verdict "
        "reuses: the same bytes under the same policy, detectors and decode settings.",
    )
    policy_version: str
    request_id: str | None = None
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


def error_verdict(
    source: Source, policy_version: str, code: ErrorCode, message: str, **extra: Any
) -> Verdict:
    return Verdict(
        id=verdict_id(source, policy_version),
        source=source,
        status="error",
        error=ErrorInfo(code=code, message=message),
        policy_version=policy_version,
        **extra,
    )
