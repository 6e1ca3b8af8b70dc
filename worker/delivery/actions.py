"""Optional S3 actions on a moderated object, chosen by the policy: tag it with its
decision, or move it to a quarantine location (copy, verify, then delete). Error verdicts
follow the policy's ``errors`` rules (tag ``error`` by default), so an object that could
not be judged never looks judged.

They run after the verdict is on the stream, and their outcome is recorded by verdict id
(``outcome``); until it is, every copy of the message runs them again. So both are
idempotent: tagging writes the same value, and a quarantine that already happened (copy
present, original gone) is recognised and reported as done.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from modgate import keys
from modgate.errors import ErrorCode
from modgate.policy import PolicyActions, QuarantineAction, ResolvedErrorRule

# In the light package since the review console releases from quarantine (its inverse).
from modgate.quarantine import MoveError, move
from modgate.quarantine import quarantine_key as quarantine_key
from modgate.verdict import Verdict

log = logging.getLogger(__name__)

# S3 answers that will not change by trying again: recorded as the outcome.
_PERMANENT = {
    "AccessDenied",
    "403",
    "404",
    "NoSuchKey",
    "NoSuchBucket",
    "NoSuchVersion",
    "PreconditionFailed",
    "412",
    "InvalidRequest",
    "InvalidArgument",
    "InvalidTag",
    "MethodNotAllowed",
}


class ActionError(Exception):
    """An action refused for a reason of its own (object changed, bad copy): not retried."""


class TransientActionError(Exception):
    """An action failed in a way that may pass (S3 5xx or throttling after botocore's own
    retries, a lost connection): the outcome is not recorded, so it runs again."""


def _code(exc: Any) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


# The tag value of an error verdict's object: not a decision, so never taken for one.
ERROR_TAG = "error"
# Error codes with no object of ours to act on: recorded as skipped, S3 is not called.
NO_OBJECT = {
    ErrorCode.NOT_FOUND: "the object was not found when fetched",
    ErrorCode.BUCKET_NOT_ALLOWED: "the bucket is outside worker.buckets: not ours to change",
    ErrorCode.INVALID_MESSAGE: "the message names no valid object",
}
DEFAULT_ERROR_RULE = ResolvedErrorRule("tag", False)


def _quarantine_to(q: QuarantineAction, source: Any) -> str | None:
    """The quarantine URI for ``source``'s object, or None when the object already lies in
    that location: a copy there that is judged again (the bucket's notifications may cover
    the prefix) must not move on to ``<prefix><prefix>…`` without end."""
    bucket = q.bucket or source.bucket
    if q.prefix and bucket == source.bucket and source.key.startswith(q.prefix):
        return None
    return f"s3://{bucket}/{quarantine_key(q.prefix, source.key)}"


def plan(
    verdict: Verdict, actions: PolicyActions, rule: ResolvedErrorRule | None = None
) -> dict[str, Any] | None:
    """What the policy calls for on this verdict's object (the verdict's ``policy_actions``).
    ``rule``: the policy's rule for an error verdict's code (``Policy.error_rule``)."""
    source = verdict.source
    if source.kind != "s3" or not source.bucket or not source.key:
        return None
    if verdict.error is not None:
        return _error_plan(verdict, actions, rule or DEFAULT_ERROR_RULE)
    if verdict.status != "ok" or verdict.decision is None:
        return None
    wanted: dict[str, Any] = {}
    if actions.tag:
        wanted["tag"] = {actions.tag_key: verdict.decision}
    q = actions.quarantine
    if q is not None and verdict.decision in q.decisions and (target := _quarantine_to(q, source)):
        wanted["quarantine_to"] = target
    return wanted or None


def _error_plan(verdict: Verdict, actions: PolicyActions, rule: ResolvedErrorRule) -> dict[str, Any] | None:
    assert verdict.error is not None
    if rule.action == "none":
        return None
    code = verdict.error.code
    if code in NO_OBJECT:
        return {"skip": f"{code.value}: {NO_OBJECT[code]}"}
    wanted: dict[str, Any] = {"tag": {actions.tag_key: ERROR_TAG}}
    # its default location when none is set
    if rule.action == "quarantine" and (
        target := _quarantine_to(actions.quarantine or QuarantineAction(), verdict.source)
    ):
        wanted["quarantine_to"] = target
    return wanted


def outcome_id(verdict: Verdict) -> str:
    """The key an action outcome is recorded under: the verdict id, with the error code for
    an error verdict, so a later ok verdict of the same object (same id, after a transient
    error) still runs its own actions."""
    return verdict.id if verdict.error is None else f"{verdict.id}:{verdict.error.code.value}"


def outcome(redis: Any, verdict_id: str) -> dict[str, Any] | None:
    """What the S3 actions did for ``verdict_id`` (``tagged``, ``quarantined_to``, ``error``),
    or None while they have not run to an outcome."""
    raw = redis.get(keys.action_outcome(verdict_id))
    return json.loads(raw) if raw is not None else None


def record_outcome(redis: Any, verdict_id: str, done: dict[str, Any], ttl_s: int) -> None:
    redis.set(keys.action_outcome(verdict_id), json.dumps(done), ex=ttl_s)


class ObjectActions:
    def __init__(self, client: Any) -> None:
        self.client = client

    def apply(
        self, verdict: Verdict, actions: PolicyActions, rule: ResolvedErrorRule | None = None
    ) -> dict[str, Any] | None:
        """Run what ``plan`` calls for; returns what was done (the outcome to record), with
        ``error`` for a permanent failure and ``skipped`` where there is no object to act
        on. Raises ``TransientActionError`` for a failure that may pass."""
        source = verdict.source
        wanted = plan(verdict, actions, rule)
        if wanted is None:
            return None
        if "skip" in wanted:
            return {"skipped": wanted["skip"]}
        done: dict[str, Any] = {}
        try:
            tagged = False
            for tag_key, value in wanted.get("tag", {}).items():
                tagged = self.tag(source.bucket, source.key, source.version_id, tag_key, value)
                if tagged:
                    done["tagged"] = {tag_key: value}
            if "quarantine_to" in wanted:
                target_bucket, _, target_key = wanted["quarantine_to"].removeprefix("s3://").partition("/")
                done["quarantined_to"] = self.quarantine(
                    source.bucket, source.key, source.version_id, source.etag, target_bucket, target_key
                )
                if "tag" in wanted and not tagged:
                    done["tagged"] = wanted["tag"]  # moved by an earlier run, tag and all
            elif "tag" in wanted and not tagged:
                done["error"] = "NoSuchKey: the object is not there; nothing tagged"
        except Exception as exc:
            if _transient(exc):
                raise TransientActionError(f"{type(exc).__name__}: {exc}") from exc
            log.warning("S3 action on %s failed: %s", source.uri, exc)
            done["error"] = f"{type(exc).__name__}: {exc}"
        return done or None

    def tag(
        self, bucket: str | None, key: str | None, version_id: str | None, tag_key: str, value: str
    ) -> bool:
        kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key}
        if version_id:
            kwargs["VersionId"] = version_id
        try:
            existing = self.client.get_object_tagging(**kwargs)["TagSet"]
        except Exception as exc:
            if _code(exc) in ("NoSuchKey", "404"):
                return False  # gone: quarantined by an earlier delivery, or deleted
            raise
        tags = [t for t in existing if t["Key"] != tag_key] + [{"Key": tag_key, "Value": value}]
        self.client.put_object_tagging(**kwargs, Tagging={"TagSet": tags})
        return True

    def quarantine(
        self,
        bucket: str | None,
        key: str | None,
        version_id: str | None,
        etag: str | None,
        target_bucket: str | None,
        target_key: str,
    ) -> str:
        """Copy, verify the copy's size, delete the original (``modgate.quarantine.move``,
        the review console's move too). Never bytes we did not judge: with an ETag the move
        is checked here and made atomic by S3 itself (CopySourceIfMatch)."""
        if not bucket or key is None or not target_bucket:
            raise ActionError("no object to quarantine (bucket and key are needed)")
        try:
            return move(
                self.client, (bucket, key), (target_bucket, target_key), version_id=version_id, etag=etag
            )
        except MoveError as exc:
            raise ActionError(str(exc)) from None


def _transient(exc: Exception) -> bool:
    if isinstance(exc, ActionError):
        return False
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(exc, ClientError):  # S3 answered
        return _code(exc) not in _PERMANENT
    return isinstance(exc, (BotoCoreError, OSError))  # S3 did not answer (connection, timeout)
