"""Quarantine locations and the S3 moves in and out of them, for the review console.

The worker quarantines an object after its verdict (worker/delivery/actions.py calls
``move``: copy to ``quarantine_key(prefix, key)``, verify, delete the original). ``release`` is its inverse,
for a reviewer who overturns the verdict to safe: copy the quarantined object back to its
original key, verify, delete the quarantined copy. ``quarantine`` moves an object a reviewer
judged unsafe the same way the worker does. Both are idempotent in the same way as the
worker's move: a move that already happened (destination present, source gone) is reported
as done, so a decision applied twice (a retry, a crash between move and record) is harmless.

The S3 client (boto3's, or anything with its ``head_object``/``copy_object``/``delete_object``/
tagging calls) is passed in; this module imports no boto3.
"""

from __future__ import annotations

from typing import Any


class MoveError(Exception):
    """A move refused for a reason of its own (a copy of the wrong size, an object that
    changed, nothing at either end): retrying the same call will not help."""


def quarantine_key(prefix: str, key: str) -> str:
    """Where a quarantined object goes under ``prefix``. "." and ".." segments (S3 keeps
    them literally; ``invalid_key`` verdicts have them) are escaped, so no store or proxy
    that normalises paths can resolve the copy outside the prefix."""
    parts = key.split("/")
    return prefix + "/".join(p.replace(".", "%2E") if p in (".", "..") else p for p in parts)


def split_uri(uri: str) -> tuple[str, str]:
    """(bucket, key) of an ``s3://bucket/key`` URI; ValueError for anything else."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket or not key:
        raise ValueError(f"no bucket or key in {uri!r}")
    return bucket, key


def error_code(exc: BaseException) -> str:
    """The S3 error code of a botocore ClientError ("" for anything else)."""
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def _missing(exc: BaseException) -> bool:
    return error_code(exc) in ("NoSuchKey", "404", "NotFound")


def _head(client: Any, bucket: str, key: str, version_id: str | None = None) -> dict[str, Any] | None:
    kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key}
    if version_id:
        kwargs["VersionId"] = version_id
    try:
        return client.head_object(**kwargs)
    except Exception as exc:
        if _missing(exc):
            return None
        raise


def move(
    client: Any,
    source: tuple[str, str],
    target: tuple[str, str],
    *,
    version_id: str | None = None,
    etag: str | None = None,
    overwrite: bool = True,
) -> str:
    """Copy ``source`` (bucket, key) to ``target``, check the copy's size, then delete the
    source; returns the target URI. Done already (target present, source gone): returns it
    too. ``etag``: move only these bytes (checked, and by S3 itself with CopySourceIfMatch).
    ``overwrite=False``: an object already at the target with other bytes (another ETag) is
    kept and the move refused; with the same bytes (an earlier run stopped before its
    delete) the move just finishes."""
    if source == target:
        raise MoveError("source and target are the same object")
    (bucket, key), (target_bucket, target_key) = source, target
    uri = f"s3://{target_bucket}/{target_key}"
    src = _head(client, bucket, key, version_id)
    if src is None:
        if _head(client, target_bucket, target_key) is not None:
            return uri  # moved by an earlier run
        raise MoveError(f"NoSuchKey: neither s3://{bucket}/{key} nor {uri} exists: nothing to move")
    if not overwrite:
        existing = _head(client, target_bucket, target_key)
        if existing is not None and existing.get("ETag") != src.get("ETag"):
            raise MoveError(f"{uri} already holds another object: kept, s3://{bucket}/{key} not moved")
    copy_source: dict[str, Any] = {"Bucket": bucket, "Key": key}
    if version_id:
        copy_source["VersionId"] = version_id
    kwargs: dict[str, Any] = {"Bucket": target_bucket, "Key": target_key, "CopySource": copy_source}
    if etag and not version_id:
        if src["ETag"].strip('"') != etag.strip('"'):
            raise MoveError(f"s3://{bucket}/{key} changed since it was judged: not moved")
        kwargs["CopySourceIfMatch"] = '"' + etag.strip('"') + '"'
    client.copy_object(**kwargs)
    dst = _head(client, target_bucket, target_key)
    if dst is None or dst["ContentLength"] != src["ContentLength"]:
        size = None if dst is None else dst["ContentLength"]
        raise MoveError(
            f"copy of s3://{bucket}/{key} at {uri} has {size} bytes, the original "
            f"{src['ContentLength']}: original kept"
        )
    delete: dict[str, Any] = {"Bucket": bucket, "Key": key}
    if version_id:
        delete["VersionId"] = version_id
    client.delete_object(**delete)
    return uri


def quarantine(
    client: Any,
    bucket: str,
    key: str,
    prefix: str,
    *,
    target_bucket: str | None = None,
    version_id: str | None = None,
    etag: str | None = None,
) -> str:
    """Move ``bucket``/``key`` to ``target_bucket`` (default: its own) under ``prefix``, as
    the worker's quarantine does; returns the quarantine URI."""
    target = (target_bucket or bucket, quarantine_key(prefix, key))
    return move(client, (bucket, key), target, version_id=version_id, etag=etag)


def release(client: Any, quarantined_uri: str, bucket: str, key: str) -> str:
    """The inverse of the worker's quarantine: move the object at ``quarantined_uri`` back to
    ``bucket``/``key`` (copy, check the size, delete the quarantined copy); returns the
    original URI. Already released (original present, quarantined copy gone): returns it.
    The copy back is a new object (and a new version in a versioned bucket): it fires a new
    upload event, which the review's allow-list bank answers. An object uploaded to the
    original key since the quarantine is never overwritten (MoveError)."""
    return move(client, split_uri(quarantined_uri), (bucket, key), overwrite=False)


def tag(client: Any, bucket: str, key: str, tag_key: str, value: str) -> bool:
    """Set one tag on an object, keeping its other tags; False if the object is not there."""
    try:
        existing = client.get_object_tagging(Bucket=bucket, Key=key)["TagSet"]
    except Exception as exc:
        if _missing(exc):
            return False
        raise
    tags = [t for t in existing if t["Key"] != tag_key] + [{"Key": tag_key, "Value": value}]
    client.put_object_tagging(Bucket=bucket, Key=key, Tagging={"TagSet": tags})
    return True
