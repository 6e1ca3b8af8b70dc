"""Fetch stage: turns targets (files, directories, ``s3://bucket/prefix``) into sources
and sources into bytes, with size caps, bounded retries and a clear code per failure.

One boto3 client serves every fetch thread (boto3 clients are thread-safe);
``endpoint_url`` makes MinIO, moto and other S3-compatible servers work; credentials come
from boto3's own chain.
"""

from __future__ import annotations

import hashlib
import os
import random
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.errors import ErrorCode, ModerationError
from worker.settings import S3Settings
from worker.verdict import Source

_CHUNK = 1 << 20
_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "404", "NotFound", "NoSuchVersion"}
_DENIED = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"}


class TargetError(Exception):
    """A target that cannot be listed at all: a usage or infrastructure problem."""


@dataclass(frozen=True)
class Fetched:
    source: Source
    data: bytes


def _strip_etag(etag: str | None) -> str | None:
    return etag.strip('"') if etag else etag


class Fetcher:
    def __init__(self, settings: S3Settings) -> None:
        self.settings = settings
        self._client: Any = None
        self._lock = threading.Lock()

    # -- targets ----------------------------------------------------------------------

    @staticmethod
    def parse_s3_uri(uri: str) -> tuple[str, str]:
        if not uri.startswith("s3://"):
            raise TargetError(f"not an s3:// URI: {uri}")
        bucket, _, prefix = uri[5:].partition("/")
        if not bucket:
            raise TargetError(f"no bucket in {uri}")
        return bucket, prefix

    def expand(self, target: str) -> Iterator[Source]:
        if target.startswith("s3://"):
            yield from self._list_s3(*self.parse_s3_uri(target))
            return
        path = Path(target)
        if path.is_dir():
            yield from self._walk(path.resolve())
        elif path.exists():
            yield Source(kind="file", uri=str(path.resolve()), path=str(path.resolve()))
        else:
            raise FileNotFoundError(f"no such file or directory: {target}")

    @staticmethod
    def _walk(root: Path) -> Iterator[Source]:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                full = os.path.join(dirpath, name)
                if os.path.isfile(full):
                    yield Source(kind="file", uri=full, path=full)

    def _list_s3(self, bucket: str, prefix: str) -> Iterator[Source]:
        from botocore.exceptions import BotoCoreError, ClientError

        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    key = obj["Key"]
                    if key.endswith("/"):
                        continue  # "folder" placeholder objects
                    yield Source(
                        kind="s3",
                        uri=f"s3://{bucket}/{key}",
                        bucket=bucket,
                        key=key,
                        etag=_strip_etag(obj.get("ETag")),
                        size=obj.get("Size"),
                    )
        except ClientError as exc:
            raise TargetError(f"cannot list s3://{bucket}/{prefix}: {exc}") from None
        except BotoCoreError as exc:
            raise TargetError(f"cannot list s3://{bucket}/{prefix}: {exc}") from None

    # -- fetching ---------------------------------------------------------------------

    @property
    def client(self) -> Any:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    import boto3
                    from botocore.config import Config

                    s = self.settings
                    config = Config(
                        retries={"mode": "standard", "max_attempts": s.max_attempts},
                        connect_timeout=s.connect_timeout_s,
                        read_timeout=s.read_timeout_s,
                        max_pool_connections=s.max_concurrency,
                        region_name=s.region,
                    )
                    self._client = boto3.session.Session().client(
                        "s3", endpoint_url=s.endpoint_url, config=config
                    )
        return self._client

    def fetch(self, source: Source) -> Fetched:
        if source.kind == "file":
            return self._fetch_file(source)
        return self._fetch_s3(source)

    def _too_large(self, size: int) -> ModerationError:
        return ModerationError(
            ErrorCode.TOO_LARGE,
            f"object is {size} bytes, above the limit of {self.settings.max_object_bytes}",
        )

    def _fetch_file(self, source: Source) -> Fetched:
        cap = self.settings.max_object_bytes
        path = source.path or source.uri
        try:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):
                raise ModerationError(ErrorCode.FETCH_FAILED, f"not a regular file: {path}")
            size = st.st_size
            if size > cap:
                raise self._too_large(size)
            with open(path, "rb") as fh:
                data = fh.read(cap + 1)
        except FileNotFoundError:
            raise ModerationError(ErrorCode.NOT_FOUND, f"no such file: {path}") from None
        except PermissionError:
            raise ModerationError(ErrorCode.ACCESS_DENIED, f"permission denied: {path}") from None
        except OSError as exc:
            raise ModerationError(ErrorCode.FETCH_FAILED, f"cannot read {path}: {exc}") from None
        if len(data) > cap:  # the file grew after stat
            raise self._too_large(len(data))
        if not data:
            raise ModerationError(ErrorCode.EMPTY_OBJECT, "the file is empty (0 bytes)")
        digest = hashlib.sha256(data).hexdigest()
        return Fetched(source.model_copy(update={"size": len(data), "sha256": digest}), data)

    def _fetch_s3(self, source: Source) -> Fetched:
        from botocore.exceptions import BotoCoreError, ClientError

        if source.size is not None and source.size > self.settings.max_object_bytes:
            raise self._too_large(source.size)
        attempts = self.settings.max_attempts
        for attempt in range(1, attempts + 1):
            try:
                return self._get_once(source)
            except ClientError as exc:
                raise self._classify(exc, source) from None
            except (BotoCoreError, OSError) as exc:
                # botocore already retried the request itself; this covers failures while
                # streaming the body, which it does not retry.
                if attempt == attempts:
                    raise ModerationError(
                        ErrorCode.FETCH_FAILED,
                        f"{source.uri}: {type(exc).__name__}: {exc} (after {attempts} attempts)",
                    ) from None
                time.sleep(random.uniform(0, min(5.0, 0.1 * 2**attempt)))
        raise AssertionError("unreachable")

    def _get_once(self, source: Source) -> Fetched:
        kwargs: dict[str, Any] = {"Bucket": source.bucket, "Key": source.key}
        if source.version_id:
            kwargs["VersionId"] = source.version_id
        response = self.client.get_object(**kwargs)
        body = response["Body"]
        try:
            etag = _strip_etag(response.get("ETag"))
            if source.etag and not source.version_id and etag and etag != source.etag:
                raise ModerationError(
                    ErrorCode.NOT_FOUND,
                    f"{source.uri}: object changed since it was listed (ETag {etag} != {source.etag})",
                )
            length = response.get("ContentLength")
            if length is not None and length > self.settings.max_object_bytes:
                raise self._too_large(length)
            chunks: list[bytes] = []
            total = 0
            for chunk in body.iter_chunks(_CHUNK):
                total += len(chunk)
                if total > self.settings.max_object_bytes:  # a lying or absent Content-Length
                    raise self._too_large(total)
                chunks.append(chunk)
        finally:
            body.close()
        if total == 0:
            raise ModerationError(ErrorCode.EMPTY_OBJECT, f"{source.uri} is empty (0 bytes)")
        version = response.get("VersionId")
        update = {
            "size": total,
            "etag": etag or source.etag,
            # Unversioned buckets answer the literal "null".
            "version_id": version if version and version != "null" else source.version_id,
        }
        return Fetched(source.model_copy(update=update), b"".join(chunks))

    @staticmethod
    def _classify(exc: Any, source: Source) -> ModerationError:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        message = f"{source.uri}: {code or status}: {error.get('Message', '')}".rstrip(": ")
        if code in _NOT_FOUND or status == "404":
            return ModerationError(ErrorCode.NOT_FOUND, message)
        if code in _DENIED or status == "403":
            return ModerationError(ErrorCode.ACCESS_DENIED, message)
        return ModerationError(ErrorCode.FETCH_FAILED, message)
