"""The image of a queued verdict, proxied from S3 to the reviewer's browser.

The S3 endpoint is often reachable only inside the cluster, and a presigned URL would hand
the browser a credential: the console streams the bytes itself. It reads from where the
object is now (the quarantine location the worker recorded under ``keys.action_outcome``,
else the verdict's source), refuses objects over ``console.image_max_bytes`` before
sending a byte, and names the type from the bytes' own signature (never from S3's
Content-Type) among a few image types browsers render; anything else is refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from modgate import keys

CHUNK = 64 * 1024
SNIFF_BYTES = 32

# Headers on every image answer: no other interpretation of the bytes, nothing active in
# them, no copy kept by the browser or a proxy.
IMAGE_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'",
    "Cache-Control": "no-store",
}


def sniff(head: bytes) -> str | None:
    """The image type of these first bytes, among those allowed; None for anything else."""
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis"):
        return "image/avif"
    return None


class ImageError(Exception):
    """Why an image cannot be shown; ``status`` is the HTTP answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class Location:
    bucket: str
    key: str
    version_id: str | None = None

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def locate(redis: Any, verdict: dict[str, Any]) -> Location | None:
    """Where the verdict's object lies now: its quarantine copy if the worker moved it."""
    raw = redis.get(keys.action_outcome(verdict.get("id", "")))
    if raw:
        try:
            outcome = json.loads(raw)
        except ValueError:
            outcome = {}
        target = outcome.get("quarantined_to") if isinstance(outcome, dict) else None
        if isinstance(target, str) and target.startswith("s3://"):
            bucket, _, key = target.removeprefix("s3://").partition("/")
            if bucket and key:
                return Location(bucket, key)
    source = verdict.get("source") or {}
    if source.get("kind") == "s3" and source.get("bucket") and source.get("key"):
        return Location(source["bucket"], source["key"], source.get("version_id"))
    return None


@dataclass
class Image:
    content_type: str
    length: int
    chunks: Iterator[bytes]


def open_image(s3: Any, location: Location, max_bytes: int) -> Image:
    """GET the object; refuse it (ImageError) when too large, missing or not an allowed image."""
    from botocore.exceptions import BotoCoreError, ClientError

    args: dict[str, Any] = {"Bucket": location.bucket, "Key": location.key}
    if location.version_id:
        args["VersionId"] = location.version_id
    try:
        response = s3.get_object(**args)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "NoSuchVersion", "NoSuchBucket", "404", "InvalidArgument"):
            raise ImageError(404, "the image is no longer there") from None
        if code in ("AccessDenied", "403"):
            raise ImageError(502, "the console may not read this object") from None
        raise ImageError(502, f"S3 answered {code or 'an error'}") from None
    except BotoCoreError as exc:
        raise ImageError(502, f"S3 unreachable: {type(exc).__name__}") from None
    body = response["Body"]
    length = int(response.get("ContentLength") or 0)
    if length > max_bytes:
        body.close()
        raise ImageError(413, f"the image has {length} bytes, more than the {max_bytes} the console shows")
    try:
        head = body.read(SNIFF_BYTES)
    except (BotoCoreError, OSError):
        body.close()
        raise ImageError(502, "S3 stopped sending the image") from None
    content_type = sniff(head)
    if content_type is None:
        body.close()
        raise ImageError(415, "not an image type the console shows (JPEG, PNG, GIF, WebP, AVIF)")

    def chunks() -> Iterator[bytes]:
        sent = len(head)
        try:
            yield head
            while sent < length:
                chunk = body.read(min(CHUNK, length - sent))
                if not chunk:
                    break
                sent += len(chunk)
                yield chunk
        finally:
            body.close()

    return Image(content_type, length, chunks())


def s3_client(settings: Any) -> Any:
    """A boto3 S3 client from ``settings.s3`` (credentials from boto3's own chain)."""
    import boto3
    from botocore.config import Config

    s3 = settings.s3
    return boto3.client(
        "s3",
        endpoint_url=s3.endpoint_url,
        region_name=s3.region,
        config=Config(
            connect_timeout=s3.connect_timeout_s,
            read_timeout=s3.read_timeout_s,
            retries={"max_attempts": 2, "mode": "standard"},
            max_pool_connections=16,
        ),
    )
