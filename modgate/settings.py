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

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from modgate import keys
from modgate.contract import DEFAULT_MAX_ITEMS
from modgate.errors import PolicyError
from modgate.policy import Policy, PolicySource, deep_merge, default_policy_dict, load_policy, read_yaml

MiB = 1024 * 1024


class RedisSettings(BaseModel):
    url: str = "redis://127.0.0.1:6379/0"


class S3Settings(BaseModel):
    # Set for MinIO, moto, Ceph...; unset = botocore's own endpoint (AWS_ENDPOINT_URL_S3,
    # AWS_ENDPOINT_URL, the AWS config file), else AWS.
    endpoint_url: str | None = None
    region: str | None = None
    max_object_bytes: int = Field(50 * MiB, gt=0)
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(30.0, gt=0)
    # Requests per object fetch, the first included (and per list/action call, which
    # botocore retries). GETs are retried by modgate, behind a gate shared by the process:
    # on throttling, 5xx or a connection error every fetch waits until it reopens.
    max_attempts: int = Field(5, ge=1)
    # The gate stays closed base × 2^(n-1) (n = failed rounds in a row, jittered to half to
    # full, at most backoff_max_s), then one probe request decides.
    backoff_base_s: float = Field(0.2, gt=0)
    backoff_max_s: float = Field(20.0, gt=0)
    max_concurrency: int = Field(32, ge=1)
    # Who sends object GETs: "lean" (worker/ingest/s3_get.py: SigV4 + a minimal keep-alive
    # HTTP/1.1 client to the endpoint botocore resolves per bucket, same answers and errors
    # as botocore at a fraction of its CPU per GET, which bounds ingest processes per GPU)
    # or "botocore". Listing and actions always use botocore.
    get_client: Literal["lean", "botocore"] = "lean"


class DecodeSettings(BaseModel):
    # Checked from the header before any pixel is allocated.
    max_pixels: int = Field(64_000_000, gt=0)
    # Animated images: at most this many frames, evenly spaced, are scored.
    max_frames: int = Field(8, ge=1)
    # Decode budget, checked from the container's blocks before decoding; over it the
    # image gets the error verdict image_too_complex. Frames in the file:
    max_decode_frames: int = Field(1000, ge=1)
    # Frames decoded × canvas pixels per image. Each sampled frame is decoded from the
    # nearest keyframe before it (a frame that replaces the whole canvas), else from frame
    # 0: a 4000×4000 GIF of 120 tiny frames is 1.9 Gpx of compositing; 500 Mpx is ~250
    # frames of 1080p.
    max_decode_pixels: int = Field(500_000_000, gt=0)
    # JPEG scans (start-of-scan segments) per image. libjpeg decodes every scan over the
    # whole image and Pillow sets no limit, so one AC scan repeated 6,000 times in an
    # 8000² progressive JPEG (0.9 MB) is ~30 s of decoding. libjpeg's standard progressive
    # script has 10 scans (6 for greyscale) and encoders that tune their scripts stay in
    # the tens; the most a script can need without repeating a band is 64 coefficients ×
    # refinement passes, which no encoder writes. 100 leaves room for odd encoders while
    # bounding the scans' cost at 100 passes over 64 Mpx (libjpeg-turbo: djpeg -maxscans).
    max_jpeg_scans: int = Field(100, ge=1)
    # Wall clock per image for decode (+ detector preprocessing in a decode process):
    # checked between frames, and a decode process past it is killed and replaced.
    max_decode_s: float = Field(10.0, gt=0)
    # Decode animated, non-JPEG and progressive/multi-scan JPEG images (and run detector
    # preprocessing) in `workers` child processes, so a decoder that hangs, crashes or runs
    # past max_decode_s mid-call costs one image, not the worker. Baseline JPEGs (one
    # sequential scan) decode on threads (bounded by the pixel cap; no copy back).
    processes: bool = True
    # Address space (MiB) a decode process may add to its size after start-up (the cap is
    # RLIMIT_AS, which counts virtual memory: idle size is ~0.2 GB, ~3.7 GB with torch
    # preparers). Over it the image gets image_too_large and the process is replaced,
    # instead of one hostile image growing until the node's OOM killer picks a random
    # process. The largest legitimate decode measured, a 64 Mpx RGBA PNG, peaks at
    # ~1.5 GB; 0 = no cap.
    process_memory_mb: int = Field(2048, ge=0)
    # JPEG draft mode: decode at 1/2, 1/4 or 1/8 scale when the result still covers the
    # largest input any enabled detector needs.
    draft: bool = True
    # Draft decoding stops at this multiple of the largest detector input. At 1× the
    # Open-NSFW score moves by up to 0.04 against a full decode (its JPEG re-encode
    # amplifies resampling differences); at 2× it stays below 0.01 on photos (docs/benchmarks.md).
    draft_factor: float = Field(2.0, ge=1.0)
    # Detectors that are not draft-tolerant (NudeNet) switch draft decoding off while they
    # run, to stay exact. True trades that exactness for speed (deviation in docs/benchmarks.md).
    draft_always: bool = False
    workers: int = Field(2, ge=1)
    # Who decodes baseline JPEGs and preprocesses for the detectors: "pil" (decode
    # threads, PIL/numpy), "tensor" (a batch decoded by torchvision — nvJPEG on CUDA — and
    # preprocessed as device tensors; anything it cannot take falls back to PIL per image:
    # worker/device/decode_tensor.py), "auto" = tensor on CUDA, pil on CPU.
    backend: Literal["pil", "tensor", "auto"] = "auto"


class BatchSettings(BaseModel):
    max_batch: int = Field(32, ge=1)
    max_wait_ms: float = Field(10.0, ge=0)


class RuntimeSettings(BaseModel):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    # Intra-op threads for torch/onnxruntime (on CPU: onnxruntime's batch lanes, see
    # onnx_cpu_parallel); None lets the runtime choose (onnxruntime lanes: the cores).
    threads: int | None = Field(None, ge=1)
    # Threads one OpenCV call may use (NudeNet's preprocessing). Images are already
    # preprocessed in parallel on the decode threads; OpenCV's default (one thread per
    # core in every call) multiplies them past the cores (worker/runtime.py).
    preprocess_threads: int = Field(1, ge=1)
    # What runs the ONNX detectors (open_nsfw, nudenet): auto = torch modules converted
    # from the ONNX files on CUDA (same device and CUDA context as the other models;
    # open_nsfw follows `precision`), onnxruntime on CPU (faster there). "torch" forces
    # the conversion on CPU too.
    onnx: Literal["auto", "onnxruntime", "torch"] = "auto"
    # How onnxruntime spreads a batch over `threads` cores on CPU: "batch" = chunks of the
    # batch run concurrently, one thread each; "op" = every operator split across an
    # intra-op pool, whose caller spins at each operator's end (worker/detectors/onnx_torch.py).
    onnx_cpu_parallel: Literal["batch", "op"] = "batch"


class InferenceSettings(BaseModel):
    """The split shape of a GPU node: one ``modgate serve-inference`` process per GPU owns
    the models and the CUDA context; several ``modgate worker`` (ingest) processes feed it,
    because one Python process cannot fetch and handle as many images per second as a
    GPU infers (docs/worker.md, "Process shape on a GPU node")."""

    # Unix socket of the inference process. On `modgate serve-inference`: where it
    # listens. On `modgate worker`: set = load no models, send every batch item there.
    socket: Path | None = None
    # serve-inference: /livez, /readyz, /metrics (0 = none).
    health_port: int = Field(9109, ge=0, le=65535)
    health_host: str = "0.0.0.0"
    # worker: how long start-up waits for the inference process (it loads the models).
    connect_timeout_s: float = Field(300.0, gt=0)
    # The socket is a trust boundary (ingest processes decode hostile bytes), checked with
    # SO_PEERCRED on both sides. serve-inference: uids allowed to connect (None = its own).
    client_uids: list[int] | None = None
    # worker: the uid the inference process must run as (None = this process's own); a
    # process of any other uid listening on the path is refused, so an ingest container
    # that rebinds the path cannot serve scores to the others.
    server_uid: int | None = None
    # Largest request or reply a side accepts (JSON header + raw arrays / JPEG bytes).
    max_message_bytes: int = Field(256 * 1024 * 1024, gt=0)


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
    # Hub commit per checkpoint id (sd_safety_checker, clip, falconsai_vit), replacing the
    # pinned defaults in worker/detectors/weights.py.
    revisions: dict[str, str] = Field(default_factory=dict)

    @property
    def strict(self) -> bool:
        return self.enabled is not None

    def ids(self) -> list[str]:
        return list(self.enabled) if self.enabled is not None else list(DEFAULT_DETECTORS)


class WorkerSettings(BaseModel):
    """How ``modgate worker`` consumes: see docs/worker.md "Delivery guarantees" for how these relate."""

    max_items: int = Field(DEFAULT_MAX_ITEMS, ge=1)
    # Messages in flight at once (threads). None = 2 × batch.max_batch, so single-key
    # messages still fill a batch while the previous one runs.
    concurrency: int | None = Field(None, ge=1)
    # Messages reserved beyond those running; 1 keeps redelivery after a crash small.
    prefetch_multiplier: int = Field(1, ge=1)
    # The longest one message may take; items not done by then get a ``timeout`` verdict.
    message_timeout_s: float = Field(240.0, gt=0)
    # Redis redelivers an unacknowledged message after this long (crash, OOM, node loss).
    # Must exceed message_timeout_s, else a slow message would be handed out twice.
    visibility_timeout_s: float = Field(300.0, gt=0)
    # On SIGTERM: messages not finished within this are put back on the queue.
    drain_timeout_s: float = Field(60.0, gt=0)
    heartbeat_s: float = Field(5.0, gt=0)
    # Prometheus /metrics plus /livez and /readyz; 0 disables the HTTP endpoint.
    metrics_port: int = Field(9108, ge=0, le=65535)
    metrics_host: str = "0.0.0.0"
    log_format: Literal["json", "text"] = "json"
    # Buckets (fnmatch patterns) whose objects this worker moderates, whatever produced the
    # message; items of other buckets get ``bucket_not_allowed``. None = any (warned at start).
    buckets: list[str] | None = None
    # A message that times out goes back to the queue (timeouts are transient) at most this
    # many times, counted per task id; then its unfinished items get ``timeout`` verdicts.
    timeout_retries: int = Field(2, ge=0)
    # Backpressure: images in the pipeline at once per process (fetch to verdict), None =
    # max(4 × batch.max_batch, 32); submitting threads wait for a free slot.
    max_inflight: int | None = Field(None, ge=1)
    # Fetched bytes waiting for a decode thread, per process; fetch threads wait above it.
    max_buffered_bytes: int = Field(256 * MiB, ge=1)

    @model_validator(mode="after")
    def _visibility_covers_a_message(self) -> WorkerSettings:
        if self.visibility_timeout_s < self.message_timeout_s + 30:
            raise ValueError(
                f"visibility_timeout_s ({self.visibility_timeout_s}) must be at least message_timeout_s "
                f"({self.message_timeout_s}) + 30 s, or slow messages would be redelivered while running"
            )
        return self

    def threads(self, max_batch: int) -> int:
        return self.concurrency or 2 * max_batch

    def inflight(self, max_batch: int) -> int:
        return self.max_inflight or max(4 * max_batch, 32)

    @property
    def admission_wait_s(self) -> float:
        """How long a reserved message may wait for its turn to enter the pipeline before it
        goes back to the queue (at no retry's cost). Its message timeout starts when it
        enters, so waiting plus running must stay inside the visibility timeout, with 10 s
        to spare for publishing; the validator above guarantees at least 20 s."""
        return self.visibility_timeout_s - self.message_timeout_s - 10

    @property
    def reconcile_after_s(self) -> float:
        """An outbox entry quiet this long, with the queue empty, was lost in transit: by
        then a queued message would have been consumed, a running one finished or timed
        out, and an unacknowledged one restored by the visibility timeout."""
        return self.visibility_timeout_s + self.message_timeout_s + 30


class ResultsSettings(BaseModel):
    stream: str = keys.VERDICT_STREAM
    # Approximate trim (XADD MAXLEN ~): Redis keeps at least this many entries.
    stream_maxlen: int = Field(1_000_000, ge=1)
    # How long a published verdict id suppresses duplicates (redeliveries, re-sent keys).
    dedup_ttl_s: int = Field(7 * 24 * 3600, ge=1)
    # Error verdicts that may pass (fetch_failed, timeout...) block a re-send only this long.
    transient_dedup_ttl_s: int = Field(600, ge=1)
    # How long the console can find a verdict's tenant and webhook URLs (keys.verdict_meta):
    # a review after this is recorded, but its verdict.reviewed webhook has nowhere to go.
    meta_ttl_s: int = Field(14 * 24 * 3600, ge=60)
    # How long the per-minute verdict counts (keys.stats_minute) stay for the dashboard.
    stats_ttl_s: int = Field(8 * 24 * 3600, ge=3600)


class HashingSettings(BaseModel):
    """PDQ of every decoded frame (the verdict's ``hashes``, PDQ banks). ``full`` (default)
    hashes full-size frames, equal to ThreatExchange's hash: JPEG draft decoding is off
    while PDQ is on (with NudeNet in the ensemble it is off anyway). ``frame`` hashes the
    frame as decoded, within 0-12 bits of ThreatExchange's hash when draft mode reduced it
    (docs/banks.md has the figures): less of PDQ's 31-bit match budget left for re-encodes,
    for faster decodes. ``off`` skips PDQ (MD5 and SHA-256 stay)."""

    pdq: Literal["full", "frame", "off"] = "full"

    @property
    def full_frames(self) -> bool:
        """Whether frames must be decoded at full size for their PDQ (no JPEG draft)."""
        return self.pdq == "full"


class BankSettings(BaseModel):
    """Hash banks in Redis (``modgate banks``), shared by the fleet: each worker keeps a copy
    in step by following the banks' changes stream (docs/banks.md)."""

    # Whether a worker follows the banks in Redis at all.
    sync: bool = True
    # How often a worker reads new changes, jittered to 0.5-1.5 × so a fleet does not poll
    # in step: a change applies in every worker within about 1.5 × this (plus its size).
    poll_interval_s: float = Field(1.0, gt=0, le=60)
    # A worker that must load a bank whole (it fell behind the stream's kept history, or a
    # refused bank became valid again) first waits a random 0..reload_jitter_s, so a fleet
    # does not read the same bank at the same moment.
    reload_jitter_s: float = Field(1.0, ge=0, le=60)
    # A worker whose copy of a bank is older than this (Redis unreachable, the bank refused
    # as invalid, so its last good copy is kept) reports itself not ready.
    max_stale_s: float = Field(120.0, gt=0)
    # Bounds on what Redis holds: banks, hashes per bank, and changes-stream entries kept
    # (each at most 1,000 hashes; a worker further behind than that loads its banks again).
    max_banks: int = Field(64, ge=1)
    max_entries: int = Field(20_000_000, ge=1)
    changes_maxlen: int = Field(2_000, ge=100)


class CacheSettings(BaseModel):
    """The score cache: the same bytes judged again under the same policy, detectors and
    decode settings reuse the first run's detector scores (never its bank matches)."""

    enabled: bool = True
    # Entries expire after ttl_s, and the oldest go once there are more than max_entries
    # (in Redis for the worker, in memory for `modgate scan`).
    ttl_s: int = Field(24 * 3600, ge=1)
    max_entries: int = Field(200_000, ge=1)
    # Also reuse the scores of a cached image whose PDQ is within this many bits (0-8), when
    # the bytes differ (a re-encode, a resize). None: off, the default: a small overlay or a
    # crafted PDQ collision stays within a few bits and changes what the detectors would see
    # (worker/judge/near_duplicates.py). Not in the split shape, where PDQ comes with the scores.
    near_duplicate_bits: int | None = Field(None, ge=0, le=8)


class WebhookSettings(BaseModel):
    # Signing secret when the tenant has none of its own. A ``whsec_<base64>`` secret's
    # Standard Webhooks key is the decoded base64; any other string's is its UTF-8 bytes
    # (docs/webhooks.md). ``Modgate-Signature`` always uses the string as given.
    secret: SecretStr | None = None
    # Also active while a rotation is under way (the old or the new secret): every
    # delivery carries one signature per active secret, so receivers may hold either.
    rotation_secrets: list[SecretStr] = Field(default_factory=list)
    # tenant -> secret, or a list of active secrets while that tenant rotates.
    secrets: dict[str, SecretStr | list[SecretStr]] = Field(default_factory=dict)
    # Receives every verdict, in addition to a message's own callback_url.
    url: str | None = None
    # Host patterns (fnmatch) a callback may name; "*" = any host that is not private.
    hosts: list[str] = Field(default_factory=lambda: ["*"])
    # Hosts or IPs allowed although they resolve to loopback/private/link-local addresses.
    allow_hosts: list[str] = Field(default_factory=list)
    # Wall-clock deadline of one POST: connect, send, status line, headers and body
    # together (an endpoint dripping bytes cannot hold a dispatcher thread longer).
    timeout_s: float = Field(10.0, gt=0)
    # Response body bytes read at most; the rest is dropped with the connection.
    max_response_bytes: int = Field(64 * 1024, ge=0)
    # Concurrent POSTs to one host:port across all dispatchers; a delivery over the cap
    # is put back on the queue for later, never waited for on a dispatcher thread.
    max_per_host: int = Field(4, ge=1)
    max_attempts: int = Field(8, ge=1)
    max_age_s: float = Field(24 * 3600.0, gt=0)
    backoff_base_s: float = Field(2.0, gt=0)
    backoff_max_s: float = Field(600.0, gt=0)
    # Approximate trim (XADD MAXLEN ~) of the dead-letter stream.
    dead_maxlen: int = Field(100_000, ge=1)

    @field_validator("secret", "rotation_secrets", "secrets")
    @classmethod
    def _secrets_are_usable(cls, value: Any) -> Any:
        from modgate.signing import check_secret

        found: list[Any] = []
        for item in value.values() if isinstance(value, dict) else [value]:
            found.extend(item if isinstance(item, list) else [item])
        for secret in found:
            if secret is not None:
                # ValueError for bad whsec_ base64 and for keys under 16 bytes: an empty
                # secret (an unset variable in a template) would sign with a known key.
                check_secret(secret.get_secret_value())
        return value

    def secrets_for(self, tenant: str | None) -> list[SecretStr]:
        """The active signing secrets of ``tenant`` (empty: its deliveries go out unsigned)."""
        if tenant is not None and tenant in self.secrets:
            own = self.secrets[tenant]
            return list(own) if isinstance(own, list) else [own]
        return [s for s in (self.secret, *self.rotation_secrets) if s is not None]


class ProducerRoute(BaseModel):
    """What to attach to keys under ``bucket``/``prefix`` (the longest matching prefix wins)."""

    bucket: str
    prefix: str = ""
    tenant: str | None = None
    callback_url: str | None = None
    policy: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _callback_without_userinfo(cls, data: Any) -> Any:
        # user:password@ is dropped before anything else sees the URL (a validation error
        # echoes its input): credentials would be copied into every message and every log
        # line that shows one; webhooks are authenticated by their signature instead.
        url = data.get("callback_url") if isinstance(data, dict) else None
        if isinstance(url, str):
            scheme, sep, rest = url.partition("://")
            end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
            if sep and "@" in rest[:end]:
                data = {**data, "callback_url": scheme + sep + rest[:end].rpartition("@")[2] + rest[end:]}
        return data

    @field_validator("callback_url")
    @classmethod
    def _callback_is_a_url(cls, value: str | None) -> str | None:
        # Checked at start-up, not when the first message with it is refused.
        if value is not None:
            from pydantic import HttpUrl

            try:
                HttpUrl(value)
            except ValueError:
                raise ValueError("callback_url is not a valid http(s) URL") from None
        return value


class ProducerSettings(BaseModel):
    # Buckets events may name; events for others are refused and counted. None = any.
    buckets: list[str] | None = None
    routes: list[ProducerRoute] = Field(default_factory=list)
    # Repeated notifications for the same (bucket, key, version/ETag) within this window
    # are enqueued once.
    dedup_ttl_s: int = Field(3600, ge=1)
    # SQS: long-poll wait, messages per receive, and how soon a message whose keys could
    # not be enqueued (Redis down) becomes visible again.
    sqs_wait_s: int = Field(20, ge=0, le=20)
    sqs_max_messages: int = Field(10, ge=1, le=10)
    sqs_retry_after_s: int = Field(10, ge=0, le=43200)
    # Prometheus /metrics of `modgate listen sqs`; 0 = off.
    metrics_port: int = Field(0, ge=0, le=65535)
    # ``eventSource`` values whose notification keys arrive unencoded (Ceph RGW); keys
    # from every other source are URL-decoded the way AWS and MinIO encode them.
    raw_key_sources: list[str] = Field(default_factory=lambda: ["ceph:s3"])

    def route(self, bucket: str, key: str) -> ProducerRoute | None:
        matches = [r for r in self.routes if r.bucket == bucket and key.startswith(r.prefix)]
        return max(matches, key=lambda r: len(r.prefix)) if matches else None


class ReceiverSettings(BaseModel):
    """``modgate serve-events``: S3/MinIO event notifications over HTTP."""

    # Bearer token (MinIO's webhook ``auth_token``) and/or an HMAC secret for a
    # ``Modgate-Signature`` header; at least one is required unless ``allow_anonymous``.
    # An empty token or a secret under 16 bytes is refused (a forger's guess, or an unset
    # variable rendered as "").
    token: SecretStr | None = Field(None, min_length=1)
    hmac_secret: SecretStr | None = None
    allow_anonymous: bool = False
    max_body_bytes: int = Field(1 * MiB, ge=1024)
    # The whole body must arrive within this many seconds, or the connection is closed
    # (408): a stalled upload cannot hold a connection and its buffer indefinitely.
    body_timeout_s: float = Field(10.0, gt=0, le=600)
    # The request line and headers must arrive within this many seconds of the connection
    # opening (or of the previous response), else it is closed: a client that never
    # finishes its headers (slowloris) cannot hold a connection forever.
    header_timeout_s: float = Field(10.0, gt=0, le=600)
    # Request bodies held at once across all connections; above it new body bytes get a
    # 503 with Retry-After, so slow or stalled senders cannot exhaust memory. Without a
    # token (HMAC only, anonymous) bodies are unverified until read, so the largest one
    # in flight gives way to a smaller one instead (fair share: a signed event has room).
    max_buffered_bytes: int = Field(64 * MiB, ge=MiB)
    # Swagger UI at /docs and ReDoc at /redoc (/openapi.json is always served).
    docs: bool = False
    # GET /metrics (Prometheus, unauthenticated, counters only); false = 404.
    metrics: bool = True

    @field_validator("hmac_secret")
    @classmethod
    def _hmac_secret_is_long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        from modgate.signing import modgate_key

        if value is not None:
            modgate_key(value.get_secret_value())  # ValueError under 16 bytes
        return value


class ConsoleSettings(BaseModel):
    """``modgate console``: the review web app for moderators (docs/review.md)."""

    # Reviewer name -> token (``MODGATE_CONSOLE__TOKENS='{"ana": "..."}'``), accepted as
    # ``Authorization: Bearer`` and by the login form. Empty tokens are refused.
    tokens: dict[str, SecretStr] = Field(default_factory=dict)
    # Take the reviewer from ``X-Forwarded-User`` (an auth proxy in front); only when the
    # console is reachable through that proxy alone, since anyone else could set it.
    trust_proxy_header: bool = False
    # Signs session cookies and CSRF tokens. Unset = a random secret per process: sessions
    # then end with the process and do not span replicas.
    session_secret: SecretStr | None = None
    session_max_age_s: int = Field(12 * 3600, ge=60)
    # How long opening an item hides it from other reviewers.
    lease_s: int = Field(120, ge=5)
    # Review queue bound (the lowest-scored items leave first) and item lifetime.
    queue_maxlen: int = Field(10_000, ge=1)
    queue_ttl_s: int = Field(14 * 24 * 3600, ge=60)
    # Unsafe verdicts also enter the queue, for a person to confirm.
    queue_unsafe: bool = False
    # Stream entries the console reads per round, and how often it reads.
    read_batch: int = Field(200, ge=1, le=10_000)
    poll_s: float = Field(2.0, gt=0)
    # Session cookie only over HTTPS; false for plain-HTTP tests.
    cookie_secure: bool = True
    # Largest image the console proxies; a larger object is refused, not truncated.
    image_max_bytes: int = Field(20 * MiB, ge=1024)

    @field_validator("tokens")
    @classmethod
    def _tokens_not_empty(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for name, token in value.items():
            if not name or len(token.get_secret_value()) < 16:
                raise ValueError("every console token needs a reviewer name and at least 16 characters")
        return value


class ReviewSettings(BaseModel):
    """Review decisions taken in the console (modgate/review.py, docs/review.md)."""

    # Approximate trim (XADD MAXLEN ~) of the reviews stream (keys.REVIEWS), which the labels
    # export reads: Redis keeps at least this many decisions.
    reviews_maxlen: int = Field(100_000, ge=1)
    # How long a verdict's winning decision (keys.review_decided) refuses a second one; longer
    # than the review queue keeps an item (console.queue_ttl_s).
    decided_ttl_s: int = Field(30 * 24 * 3600, ge=60)
    # Apply the decision to the S3 object (release from / move to quarantine, or tag) when the
    # console has an S3 client.
    apply_actions: bool = True
    # The exact (sha256) allow-list bank an overturned object's SHA-256 goes to, so its
    # release (a new upload event) is not quarantined again; created on first use.
    allow_bank: str = Field("review-allow", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    # A decision recorded this long ago and still not carried out (its process died between
    # recording it and finishing its S3 action and webhooks) is finished by the console.
    resume_after_s: float = Field(60.0, ge=1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MODGATE_",
        env_nested_delimiter="__",
        extra="forbid",
        # Errors name the field, never echo its value: secrets, tokens and URLs with
        # passwords are settings too, and start-up errors end up in logs.
        hide_input_in_errors=True,
    )

    redis: RedisSettings = Field(default_factory=RedisSettings)
    s3: S3Settings = Field(default_factory=S3Settings)
    decode: DecodeSettings = Field(default_factory=DecodeSettings)
    batch: BatchSettings = Field(default_factory=BatchSettings)
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    detectors: DetectorSettings = Field(default_factory=DetectorSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    results: ResultsSettings = Field(default_factory=ResultsSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    hashing: HashingSettings = Field(default_factory=HashingSettings)
    banks: BankSettings = Field(default_factory=BankSettings)
    webhook: WebhookSettings = Field(default_factory=WebhookSettings)
    producer: ProducerSettings = Field(default_factory=ProducerSettings)
    receiver: ReceiverSettings = Field(default_factory=ReceiverSettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    console: ConsoleSettings = Field(default_factory=ConsoleSettings)
    review: ReviewSettings = Field(default_factory=ReviewSettings)
    # A policy file replaces parts of the built-in policy; inline ``policy`` entries
    # (YAML config or env) are merged on top of that.
    policy_file: Path | None = None
    policy: Policy = Field(default_factory=lambda: Policy.model_validate(default_policy_dict()))
    # Named overlays on ``policy`` that a message selects with its ``policy`` field.
    policies: dict[str, dict[str, Any]] = Field(default_factory=dict)

    _yaml_file: ClassVar[Path | None] = None

    def named_policy(self, name: str | None) -> Policy:
        """The default policy, or the overlay called ``name`` merged over it.

        An overlay without its own ``version`` gets ``<base>+<name>``, so verdict ids under
        different policies never collide."""
        if name is None:
            return self.policy
        if name not in self.policies:
            raise KeyError(name)
        overlay = self.policies[name]
        merged = deep_merge(self.policy.model_dump(), overlay)
        if "version" not in overlay:
            merged["version"] = f"{self.policy.version}+{name}"
        return Policy.model_validate(merged)

    @model_validator(mode="before")
    @classmethod
    def _merge_policy(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        merged = default_policy_dict()
        # Files the policy came from, latest first: a problem is reported at its line there.
        sources: list[PolicySource] = []
        policy_file = data.get("policy_file")
        if policy_file:
            from_file, node = read_yaml(Path(policy_file))
            if not isinstance(from_file, dict):
                raise PolicyError(f"{policy_file}: expected a mapping at the top level")
            wrapped = isinstance(from_file.get("policy"), dict)
            merged = deep_merge(merged, from_file["policy"] if wrapped else from_file)
            sources.append(PolicySource(str(policy_file), node, ("policy",) if wrapped else ()))
        inline = data.get("policy")
        if isinstance(inline, Policy):
            return data  # built in code, already validated
        if isinstance(inline, dict):
            merged = deep_merge(merged, inline)
        elif inline is not None:
            raise PolicyError(f"policy: expected a mapping, got {type(inline).__name__}")
        if cls._yaml_file is not None:
            sources.insert(0, PolicySource(str(cls._yaml_file), read_yaml(cls._yaml_file)[1], ("policy",)))
        # Checked here, not by the field: unknown detectors and scores are refused too, and
        # the error names file and line (PolicyError is not a ValueError: pydantic passes it on).
        name = "policy (MODGATE_POLICY__*, or the built-in default)"
        return {**data, "policy": load_policy(merged, sources, name)}

    @model_validator(mode="after")
    def _named_policies_valid(self) -> Settings:
        config = read_yaml(self._yaml_file)[1] if self._yaml_file is not None else None
        for name, overlay in self.policies.items():
            merged = deep_merge(self.policy.model_dump(), overlay)
            source = PolicySource(str(self._yaml_file), config, ("policies", name))
            load_policy(merged, [source], f"policies.{name} (MODGATE_POLICIES)")
        return self

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


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from overrides, env, and the YAML file (``config`` or ``MODGATE_CONFIG``)."""
    path = config or (Path(os.environ["MODGATE_CONFIG"]) if os.environ.get("MODGATE_CONFIG") else None)
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    if path is not None:
        data, _ = read_yaml(path)  # a syntax error: file and line, not a traceback
        if data is not None and not isinstance(data, dict):
            raise PolicyError(f"{path}: expected a mapping at the top level")
    Settings._yaml_file = path
    try:
        return Settings(**overrides)
    finally:
        Settings._yaml_file = None
