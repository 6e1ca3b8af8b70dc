"""Fetch stage: turns targets (files, directories, ``s3://bucket/prefix``) into sources
and sources into bytes, with size caps, bounded retries and a clear code per failure.

One boto3 client serves every fetch thread (boto3 clients are thread-safe);
``endpoint_url`` makes MinIO, moto and other S3-compatible servers work (unset, botocore's
own ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``/config-file endpoint applies, to the lean
GET client too); credentials come from boto3's own chain. GETs are retried here, not by
botocore: a process-wide ``BackoffGate`` holds every fetch thread back while S3 sheds load,
so an outage costs a few probe requests instead of every thread retrying on its own schedule.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from modgate.errors import ErrorCode, ModerationError
from modgate.settings import S3Settings
from modgate.verdict import Source

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "404", "NotFound", "NoSuchVersion"}
_DENIED = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"}
# S3 answers that say "not now" rather than "never" (botocore's standard-mode lists).
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestThrottled",
    "RequestThrottledException",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "BandwidthLimitExceeded",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "RequestTimeoutException",
    "PriorRequestNotComplete",
}
_TRANSIENT_STATUS = {"429", "500", "502", "503", "504"}
# Marks the message of a fetch_failed that may pass: the verdict carries only code and
# message, and this is how the service tells "retry the message later" from "give up".
_TRANSIENT_MARK = "transient: "


class TargetError(Exception):
    """A target that cannot be listed at all: a usage or infrastructure problem."""


class TransientFetchError(ModerationError):
    """``fetch_failed`` that may pass (throttling, 5xx, connection errors, or no chance to
    try before the caller's deadline): the message is worth retrying later."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.FETCH_FAILED, _TRANSIENT_MARK + message)


def is_transient(code: ErrorCode | str | None, message: str | None) -> bool:
    """Whether an error (a verdict's code and message) came from ``TransientFetchError``."""
    return code == ErrorCode.FETCH_FAILED and message is not None and message.startswith(_TRANSIENT_MARK)


class GateTimeout(Exception):
    """The gate would not reopen before the caller's deadline (or the caller was cancelled)."""


class _Transient(Exception):
    """One attempt failed in a way that may pass; the text is the error's."""


class CancelLike(Protocol):
    """What the fetcher needs of ``worker.pipeline.Cancel`` (not imported: pipeline imports us)."""

    deadline: float | None

    @property
    def cancelled(self) -> bool: ...


class BackoffGate:
    """One per process, shared by every fetch thread: closed after a transient S3 failure,
    for an exponentially growing, jittered, capped delay. When the delay is over a single
    caller goes through as a probe while the others keep waiting; the probe's success opens
    the gate for all, its failure closes it for longer. Failures of requests sent before the
    gate closed (the burst in flight when the outage began) do not lengthen the delay."""

    def __init__(self, base_s: float, max_s: float, clock: Any = time.monotonic) -> None:
        self.base_s = base_s
        self.max_s = max_s
        self._clock = clock
        self._cond = threading.Condition()
        self.failures = 0  # consecutive failed rounds; 0 = open
        self.open_at = 0.0
        self._probing = False
        self._epoch = 0  # bumps on every close/open: reports from an older epoch are stale

    @property
    def closed(self) -> bool:
        return self.failures > 0

    def enter(self, cancel: CancelLike | None = None) -> tuple[int, bool]:
        """Wait until this caller may send a request; returns (epoch, is_probe) for the
        report. Raises ``GateTimeout`` instead of waiting past ``cancel``'s deadline, or
        once it is set."""
        with self._cond:
            while True:
                if not self.failures:
                    return self._epoch, False
                now = self._clock()
                if not self._probing and now >= self.open_at:
                    self._probing = True
                    return self._epoch, True
                if cancel is not None and cancel.cancelled:
                    raise GateTimeout("the caller ran out of time waiting for S3 to recover")
                deadline = cancel.deadline if cancel is not None else None
                if deadline is not None and not self._probing and self.open_at >= deadline:
                    # Nothing will get through before the caller runs out of time.
                    raise GateTimeout("S3 backoff lasts past the caller's deadline")
                until = self.open_at if not self._probing else now + 1.0
                if cancel is not None:
                    until = min(until, now + 0.2)  # Cancel.set() does not wake us: poll it
                self._cond.wait(max(0.0, until - now))

    def success(self, epoch: int, probe: bool) -> None:
        """S3 answered (any answer that is not "not now"): a successful probe opens the gate."""
        with self._cond:
            if probe:
                self._probing = False
            if epoch == self._epoch and self.failures:
                self.failures = 0
                self._epoch += 1
            self._cond.notify_all()

    def failure(self, epoch: int, probe: bool) -> float:
        """A transient failure: closes the gate (or keeps it closed); returns the delay set."""
        with self._cond:
            if probe:
                self._probing = False
            if epoch == self._epoch:
                self.failures += 1
                self._epoch += 1
                step = min(self.max_s, self.base_s * 2 ** (self.failures - 1))
                delay = random.uniform(step / 2, step)  # "equal jitter": grows, yet spread out
                self.open_at = self._clock() + delay
            self._cond.notify_all()
            return max(0.0, self.open_at - self._clock())

    def abandon(self, probe: bool) -> None:
        """The request ended with neither verdict on S3's health (a bug, an interrupt)."""
        with self._cond:
            if probe:
                self._probing = False
            self._cond.notify_all()


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
        self._get_client: Any = None
        self._session: Any = None  # one boto3 session: both clients share its credentials
        self._lock = threading.Lock()
        self.gate = BackoffGate(settings.backoff_base_s, settings.backoff_max_s)

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
        """The client for listing and S3 actions: botocore retries those itself
        (``total_max_attempts`` counts the first try; its ``max_attempts`` would not)."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._make_client(self.settings.max_attempts)
        return self._client

    @property
    def get_client(self) -> Any:
        """The client for GETs: botocore does not retry (one attempt, so its process-wide
        retry quota is never drawn on either); ``_fetch_s3`` counts and paces attempts.
        With ``s3.get_client = "lean"`` the lean client (worker/ingest/s3_get.py) stands in for
        it, sending the same one-attempt GETs at a fraction of the CPU."""
        if self._get_client is None:
            with self._lock:
                if self._get_client is None:
                    self._get_client = self._make_get_client()
        return self._get_client

    def _make_get_client(self) -> Any:
        from worker.ingest.s3_get import LeanS3Client, lean_unsupported

        client = self._make_client(1)
        if self.settings.get_client != "lean":
            return client
        reason = lean_unsupported(client)
        if reason:
            log.info("S3 GETs go through botocore: %s", reason)
            return client
        session = self._boto_session()
        ca_bundle = session._session.get_config_variable("ca_bundle")
        return LeanS3Client(client, session.get_credentials(), self.settings, ca_bundle=ca_bundle)

    def _boto_session(self) -> Any:
        import boto3

        if self._session is None:
            self._session = boto3.session.Session()
        return self._session

    def _make_client(self, total_max_attempts: int) -> Any:
        from botocore.config import Config

        s = self.settings
        config = Config(
            retries={"mode": "standard", "total_max_attempts": total_max_attempts},
            connect_timeout=s.connect_timeout_s,
            read_timeout=s.read_timeout_s,
            max_pool_connections=s.max_concurrency,
            region_name=s.region,
        )
        return self._boto_session().client("s3", endpoint_url=s.endpoint_url, config=config)

    def fetch(self, source: Source, cancel: CancelLike | None = None) -> Fetched:
        """The bytes of ``source``. ``cancel`` bounds the time spent waiting for S3 to
        recover: past its deadline the fetch gives up with ``TransientFetchError``."""
        if source.kind == "file":
            return self._fetch_file(source)
        return self._fetch_s3(source, cancel)

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

    def _fetch_s3(self, source: Source, cancel: CancelLike | None = None) -> Fetched:
        if source.size is not None and source.size > self.settings.max_object_bytes:
            raise self._too_large(source.size)
        # Attempts are ours to count (botocore does not retry GETs): each is one request,
        # and waiting at the gate costs none.
        attempts = self.settings.max_attempts
        last = ""
        for attempt in range(attempts):
            try:
                epoch, probe = self.gate.enter(cancel)
            except GateTimeout as exc:
                detail = f"; last error: {last}" if last else ""
                raise TransientFetchError(f"{source.uri}: {exc} after {attempt} attempt(s){detail}") from None
            try:
                fetched = self._attempt(source)
            except _Transient as exc:
                self.gate.failure(epoch, probe)
                last = str(exc)
                continue
            except ModerationError:
                self.gate.success(epoch, probe)  # S3 answered; the object is the problem
                raise
            except BaseException:
                self.gate.abandon(probe)
                raise
            self.gate.success(epoch, probe)
            return fetched
        raise TransientFetchError(f"{last} (after {attempts} attempts)")

    def _attempt(self, source: Source) -> Fetched:
        """One GET: the object, a ``ModerationError`` that retrying would not change, or
        ``_Transient``."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self._get_once(source)
        except ClientError as exc:
            error = self._classify(exc, source)
            if _transient_client_error(exc):
                raise _Transient(error.message) from None
            raise error from None
        except (BotoCoreError, OSError) as exc:
            message = f"{source.uri}: {type(exc).__name__}: {exc}"
            if _transient_exception(exc):
                raise _Transient(message) from None
            raise ModerationError(ErrorCode.FETCH_FAILED, message) from None

    def _get_once(self, source: Source) -> Fetched:
        kwargs: dict[str, Any] = {"Bucket": source.bucket, "Key": source.key}
        if source.version_id:
            kwargs["VersionId"] = source.version_id
        response = self.get_client.get_object(**kwargs)
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


def _transient_client_error(exc: Any) -> bool:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return code in _TRANSIENT_CODES or status in _TRANSIENT_STATUS


def _transient_exception(exc: BaseException) -> bool:
    """Connection refused/reset/timed out, a body cut off while streaming: worth retrying.
    Other botocore errors (bad parameters, no credentials) would fail the same way again."""
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError, IncompleteReadError

    return isinstance(exc, (BotoConnectionError, HTTPClientError, IncompleteReadError, OSError))
