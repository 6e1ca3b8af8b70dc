"""The error codes a verdict can carry, and the one exception type that carries them.

Every failure that concerns a single image is turned into a ``ModerationError`` with a
stable, machine-readable code; the pipeline turns it into an error verdict instead of
failing the batch around it.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    NOT_FOUND = "not_found"
    ACCESS_DENIED = "access_denied"
    TOO_LARGE = "too_large"  # object bytes above the configured cap
    IMAGE_TOO_LARGE = "image_too_large"  # pixel count above the decompression-bomb guard
    IMAGE_TOO_COMPLEX = "image_too_complex"  # over the decode budget: frames, frames × canvas, time
    UNSUPPORTED_FORMAT = "unsupported_format"
    CORRUPT_IMAGE = "corrupt_image"
    EMPTY_OBJECT = "empty_object"
    FETCH_FAILED = "fetch_failed"
    DETECTOR_FAILED = "detector_failed"
    INVALID_MESSAGE = "invalid_message"  # a queue message that does not follow the contract
    TIMEOUT = "timeout"  # not finished within worker.message_timeout_s
    BUCKET_NOT_ALLOWED = "bucket_not_allowed"  # bucket outside worker.buckets
    INVALID_KEY = "invalid_key"  # a key with "." or ".." path segments
    INTERNAL = "internal_error"


class ModerationError(Exception):
    """A per-image failure with a stable code and a message meant for humans."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message

    def __reduce__(self) -> tuple[type, tuple[ErrorCode, str]]:
        # Sent between processes (decode processes, the inference process) as it is.
        return (ModerationError, (self.code, self.message))


class ConfigError(Exception):
    """Bad settings or missing weights: an infrastructure problem, not an image's."""


class PolicyError(ConfigError):
    """A policy or settings file that cannot be used (YAML syntax, an unknown detector or
    score, a value out of range); the message names the file and line where it knows them."""
