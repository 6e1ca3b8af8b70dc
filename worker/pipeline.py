"""The one place that wires the stages together: fetch → decode → dynamic batch →
detectors → aggregate → verdict.

Fetching runs on an I/O thread pool (many objects in flight), decoding on a small CPU
pool, inference on the batcher's single thread, so decoding of the next images overlaps
inference of the current batch. Every failure concerning one image becomes an error
verdict for that image; ``submit`` never loses an item.
"""

from __future__ import annotations

import collections
import logging
import multiprocessing
import pickle
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from modgate.errors import ErrorCode, ModerationError
from modgate.policy import Policy, with_error_decision
from modgate.settings import Settings
from modgate.verdict import (
    BankMatch,
    DetectorResult,
    Hashes,
    ImageInfo,
    Source,
    Verdict,
    error_verdict,
    verdict_id,
)
from worker.detectors import LoadedDetectors, load_detectors
from worker.device.engine import (
    CLIP,
    Cancelled,
    Engine,
    FrameResult,
    LocalEngine,
    PreparedFrame,
    prepare_inputs,
)
from worker.ingest.decode import DecodedImage, Frame, decode_image
from worker.ingest.decode_pool import DecodeProcesses, Preparers
from worker.ingest.fetch import Fetched, Fetcher
from worker.ingest.hashing import (
    HASHES_REVISION,
    PDQ_FILE_KEY,
    PDQ_KEY,
    ImageHashes,
    exact_hashes,
    frame_pdq,
    frame_pdq_file,
    with_pdq,
)
from worker.ingest.probe import probe
from worker.judge.aggregator import (
    MissingScoresError,
    apply_matches,
    assess,
    decisive,
    fuse_frames,
    resolve_matches,
)
from worker.judge.score_cache import CachedScores, ScoreCache, cache_key
from worker.observe import metrics
from worker.runtime import configure_threads

log = logging.getLogger(__name__)


class Cancel:
    """Set by whoever submitted jobs once it no longer wants their verdicts (its message
    timed out or goes back to the queue), or due at ``deadline`` (``time.monotonic()``).
    Stages check it in between, so the work of a timed-out message stops instead of piling
    up behind a backlog."""

    def __init__(self, deadline: float | None = None) -> None:
        self.deadline = deadline
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set() or (self.deadline is not None and time.monotonic() >= self.deadline)


class _Budget:
    """A counting budget (images in flight, bytes buffered). Waiters give up once their
    ``Cancel`` is set; a request larger than the whole budget passes when nothing else holds
    any, so it cannot wait forever."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._cond = threading.Condition()

    def acquire(self, amount: int, cancel: Cancel | None = None) -> bool:
        with self._cond:
            while self.used and self.used + amount > self.capacity:
                if cancel is not None and cancel.cancelled:
                    return False
                self._cond.wait(0.2 if cancel is not None else None)
            self.used += amount
            return True

    def release(self, amount: int) -> None:
        with self._cond:
            self.used -= amount
            self._cond.notify_all()


class _Turns:
    """First come, first served: one submitter at a time, in arrival order. Under a backlog
    messages then enter the pipeline whole, one after the other, and finish in that order,
    instead of all advancing together and all running out of time together."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: collections.deque[object] = collections.deque()

    def take(self, cancel: Cancel | None) -> object | None:
        me = object()
        with self._cond:
            self._queue.append(me)
            while self._queue[0] is not me:
                if cancel is not None and cancel.cancelled:
                    self._queue.remove(me)
                    self._cond.notify_all()
                    return None
                self._cond.wait(0.2 if cancel is not None else None)
        return me

    def give(self, me: object) -> None:
        with self._cond:
            self._queue.remove(me)
            self._cond.notify_all()


@dataclass
class _Job:
    source: Source
    request_id: str | None
    policy: Policy
    cancel: Cancel | None = None
    future: Future[Verdict] = field(default_factory=Future)
    started: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)
    hashes: ImageHashes | None = None
    matches: list[BankMatch] = field(default_factory=list)
    cache_key: str | None = None

    def ok_verdict(self, assessment: Any, **fields: Any) -> Verdict:
        """This job's ok verdict: ``assessment``'s decision, the hashes and bank matches."""
        return Verdict(
            id=verdict_id(self.source, self.policy.version),
            source=self.source,
            status="ok",
            decision=assessment.decision,
            primary_category=assessment.primary_category,
            categories=assessment.categories,
            timings_ms=self.timings,
            policy_version=self.policy.version,
            request_id=self.request_id,
            hashes=self.hashes_block(),
            matches=self.matches,
            **fields,
        )

    def hashes_block(self) -> Hashes | None:
        if self.hashes is None:
            return None
        stored = self.hashes.pdq_file
        return Hashes(
            pdq=self.hashes.pdq,
            pdq_quality=self.hashes.pdq_quality,
            md5=self.hashes.md5,
            pdq_file=stored[0] if stored is not None else None,
            pdq_file_quality=stored[1] if stored is not None else None,
        )


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def _engine_for(settings: Settings, detectors: LoadedDetectors | None, on_batch: Any) -> Engine:
    """The models in this process, or, with ``inference.socket`` set, in the
    ``modgate serve-inference`` process listening there (nothing is loaded here)."""
    if detectors is None and settings.inference.socket is not None:
        from worker.device.engine_client import RemoteEngine

        return RemoteEngine(settings.inference)
    return LocalEngine(settings, detectors if detectors is not None else load_detectors(settings), on_batch)


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        detectors: LoadedDetectors | None = None,
        fetcher: Fetcher | None = None,
        on_batch: Callable[[int], None] | None = None,
        engine: Engine | None = None,
        banks: Callable[[], Any] | None = None,
        cache: ScoreCache | None = None,
    ) -> None:
        self.settings = settings
        # The hash banks as they stand now (a BankSet, kept in step with Redis by a BankSync
        # in the service; fixed for a `modgate scan --bank` run), or None.
        self._banks = banks
        self._cache = cache
        self._pdq = settings.hashing.pdq != "off"
        # Size native thread pools before any pool starts (decode threads vs OpenCV/torch).
        configure_threads(settings.runtime)
        self.engine: Engine = engine if engine is not None else _engine_for(settings, detectors, on_batch)
        # The detectors' metadata and preprocessing (on a remote engine: no weights here).
        self.detectors = self.engine.detectors
        self.fetcher = fetcher if fetcher is not None else Fetcher(settings.s3)
        self.policy = settings.policy
        self._loaded_ids = {d.id for d in self.detectors.detectors}
        # What scores depend on besides the bytes and the policy: the score cache's key.
        self._detector_sig = ";".join(
            sorted(f"{d.id}:{d.model}:{d.revision}" for d in self.detectors.detectors)
        )
        self._draft_side = self.detectors.draft_side(
            settings.decode.draft_always, full_frames=settings.hashing.full_frames
        )
        tensor = getattr(self.engine, "tensor", False)
        # The cached entry holds the hashes too: entries from before a change of what is
        # hashed (HASHES_REVISION) would lack a hash the banks must be matched on.
        self._decode_sig = (
            f"{settings.decode.model_dump_json()}|tensor={tensor}|draft={self._draft_side}"
            f"|pdq={settings.hashing.pdq}|hashes={HASHES_REVISION}"
        )
        self._fetch_pool = ThreadPoolExecutor(settings.s3.max_concurrency, thread_name_prefix="modgate-fetch")
        self._decode_pool = ThreadPoolExecutor(settings.decode.workers, thread_name_prefix="modgate-decode")
        self._decode_procs: DecodeProcesses | None = None
        self._parent_keys: list[str] = []  # inputs prepared here, for detectors without a preparer
        # A daemonic process (e.g. a multiprocessing pool's worker) may not have children.
        if settings.decode.processes and not multiprocessing.current_process().daemon:
            preparers, self._parent_keys = self._preparers()
            self._decode_procs = DecodeProcesses(
                settings.decode.workers,
                settings.decode,
                self._draft_side,
                preparers,
                keep_frames=bool(self._parent_keys),
            )
        # Backpressure: what one process holds stays bounded however long the backlog is.
        self._slots = _Budget(settings.worker.inflight(settings.batch.max_batch))
        self._buffered = _Budget(settings.worker.max_buffered_bytes)
        self._turns = _Turns()

    # -- public -------------------------------------------------------------------------

    def submit(
        self,
        source: Source,
        request_id: str | None = None,
        policy: Policy | None = None,
        cancel: Cancel | None = None,
    ) -> Future[Verdict]:
        """Moderate one image; the future resolves to a verdict (ok or error), or fails with
        ``Cancelled`` once ``cancel`` is set before the verdict is ready.

        Blocks while ``worker.max_inflight`` images are in the pipeline: the caller is a
        message's own thread, and making it wait is what keeps memory flat under a backlog."""
        job = _Job(source, request_id, policy or self.policy, cancel)
        if not self._slots.acquire(1, cancel):
            job.future.set_exception(Cancelled(f"{source.uri}: cancelled before it entered the pipeline"))
            return job.future
        job.future.add_done_callback(lambda _: self._slots.release(1))
        job.started = time.perf_counter()
        self._fetch_pool.submit(self._guard, job, self._fetch_stage, job)
        return job.future

    @contextmanager
    def admission(self, cancel: Cancel | None = None) -> Iterator[bool]:
        """Hold the submitting turn (first come, first served) while submitting a message's
        items; yields False if ``cancel`` was set before the turn came."""
        me = self._turns.take(cancel)
        try:
            yield me is not None
        finally:
            if me is not None:
                self._turns.give(me)

    def moderate(self, sources: Iterable[Source], max_inflight: int | None = None) -> Iterator[Verdict]:
        """Verdicts for ``sources`` in completion order, with at most ``max_inflight`` in
        flight so a bucket of millions of keys does not queue up in memory."""
        limit = max_inflight or max(4 * self.settings.batch.max_batch, self.settings.s3.max_concurrency)
        inflight: set[Future[Verdict]] = set()
        for source in sources:
            inflight.add(self.submit(source))
            if len(inflight) >= limit:
                done, inflight = wait(inflight, return_when=FIRST_COMPLETED)
                yield from (f.result() for f in done)
        while inflight:
            done, inflight = wait(inflight, return_when=FIRST_COMPLETED)
            yield from (f.result() for f in done)

    def alive(self) -> bool:
        """False once the inference thread has died: the process should be restarted."""
        return self.engine.alive()

    def close(self) -> None:
        self._fetch_pool.shutdown(wait=True)
        self.engine.close()  # before the decode pool: the tensor path's fallbacks go there
        self._decode_pool.shutdown(wait=True)
        if self._decode_procs is not None:
            self._decode_procs.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- stages -------------------------------------------------------------------------

    def _guard(self, job: _Job, stage, *args) -> None:  # type: ignore[no-untyped-def]
        """Run a stage; turn whatever it raises into this job's error verdict."""
        if job.cancel is not None and job.cancel.cancelled:
            self._cancelled(job)
            return
        try:
            stage(*args)
        except ModerationError as exc:
            self._fail(job, exc.code, exc.message)
        except Exception as exc:
            log.exception("internal error moderating %s", job.source.uri)
            self._fail(job, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    def _fetch_stage(self, job: _Job) -> None:
        t = time.perf_counter()
        try:
            fetched = self.fetcher.fetch(job.source, cancel=job.cancel)  # S3 backoff ends with it
        finally:
            job.timings["fetch_ms"] = _ms(time.perf_counter() - t)
        job.source = fetched.source
        t = time.perf_counter()
        md5, sha256 = exact_hashes(fetched.data)
        job.hashes = ImageHashes(md5, sha256)
        if job.source.sha256 is None:
            job.source = job.source.model_copy(update={"sha256": sha256})
        banks = self._banks() if self._banks is not None else None
        if banks is not None:
            # Before any decoder sees the bytes: a known file needs no decode and no model.
            job.matches = resolve_matches(banks.match_exact(md5, sha256), job.policy)
        job.timings["hash_ms"] = _ms(time.perf_counter() - t)
        if decisive(job.matches, job.policy, final=False):
            self._judge_by_banks(job, None)
            return
        if self._cached(job):
            return
        size = len(fetched.data)
        if not self._buffered.acquire(size, job.cancel):
            self._cancelled(job)
            return
        if self.engine.tensor and fetched.data[:3] == b"\xff\xd8\xff":
            future = self.engine.submit_jpeg(fetched.data, job.cancel)
            future.add_done_callback(lambda f: self._tensor_done(job, fetched, size, f))
            return
        self._decode_pool.submit(self._decode_buffered, job, fetched, size)

    def _decode_buffered(self, job: _Job, fetched: Fetched, size: int) -> None:
        try:
            self._guard(job, self._decode_stage, job, fetched)
        finally:
            self._buffered.release(size)

    @staticmethod
    def _cancelled(job: _Job) -> None:
        if not job.future.done():
            job.future.set_exception(Cancelled(f"{job.source.uri}: cancelled"))

    def _decode_stage(self, job: _Job, fetched: Fetched) -> None:
        decoded, prepared = self._decode_and_prepare(job, fetched.data)
        if self._match_pdq(job):
            self._judge_by_banks(job, decoded)
            return
        if self._near_cached(job, decoded):
            return
        self._submit_frames(job, decoded, prepared)

    def _match_pdq(self, job: _Job) -> bool:
        """The PDQ banks on this image's frames, and on the file's own PDQ where its EXIF
        orientation turned the first frame (``pdq_file``: what ThreatExchange lists hold);
        True when a match makes the models moot."""
        banks = self._banks() if self._banks is not None else None
        if banks is None or job.hashes is None or not job.hashes.match_pdqs:
            return False
        job.matches = [*job.matches, *resolve_matches(banks.match_pdq(job.hashes.match_pdqs), job.policy)]
        return decisive(job.matches, job.policy)

    def _judge_by_banks(self, job: _Job, decoded: DecodedImage | None) -> None:
        """A verdict from the banks' matches alone: the models were skipped."""
        image = _image_info(decoded) if decoded is not None else None
        job.timings["total_ms"] = _ms(time.perf_counter() - job.started)
        job.future.set_result(job.ok_verdict(apply_matches(None, job.matches), image=image))

    def _submit_frames(self, job: _Job, decoded: DecodedImage, prepared: list[PreparedFrame]) -> None:
        futures = [self.engine.submit_frame(item) for item in prepared]
        remaining = [len(futures)]
        lock = threading.Lock()

        def on_frame_done(_: Future[FrameResult]) -> None:
            with lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if last:
                self._guard(job, self._finish, job, decoded, futures)

        for f in futures:
            f.add_done_callback(on_frame_done)

    def _tensor_done(self, job: _Job, fetched: Fetched, size: int, future: Future[Any]) -> None:
        """On the decode-batch thread: the image's frame goes to the inference batcher, or,
        when the tensor path left it (Fallback, or its batch item raised), to the PIL path."""
        from worker.device.decode_tensor import Cancelled as NotDecoded
        from worker.device.decode_tensor import Fallback

        try:
            outcome = future.result()
        except Exception as exc:
            outcome = Fallback(f"tensor path: {type(exc).__name__}: {exc}")
        if isinstance(outcome, Fallback):
            try:
                self._decode_pool.submit(self._decode_buffered, job, fetched, size)
                return
            except RuntimeError as exc:  # the pool is shut down: the job still gets a verdict
                outcome = ModerationError(ErrorCode.INTERNAL, f"PIL fallback refused: {exc}")
        self._buffered.release(size)
        if isinstance(outcome, NotDecoded):
            self._cancelled(job)
            return
        self._guard(job, self._tensor_frames, job, outcome, fetched.data)

    def _tensor_frames(self, job: _Job, outcome: Any, data: bytes) -> None:
        if isinstance(outcome, ModerationError):
            raise outcome  # the shared decode budget refused it: its error verdict
        # The frame stayed on the device (in the inference process, on the split shape) and
        # was hashed there: PDQ's downsample on the device, the 64×64 buffer to the host
        # (worker.device.pdq_tensor). The models have run already, so a match only joins
        # the verdict.
        t = time.perf_counter()
        if self._pdq:
            if not outcome.pdqs:
                # An engine whose hashing.pdq is off: no verdict without the hash it promises.
                raise ModerationError(ErrorCode.DETECTOR_FAILED, "the engine sent no PDQ hash of the frame")
            hashes = job.hashes or ImageHashes(*exact_hashes(data))
            job.hashes = hashes.with_pdqs(outcome.pdqs, outcome.pdq_file)
            self._match_pdq(job)
        job.timings["hash_ms"] = _ms(job.timings.get("hash_ms", 0.0) / 1000.0 + time.perf_counter() - t)
        job.timings["decode_ms"] = _ms(outcome.decode_s)
        job.timings["prepare_ms"] = _ms(outcome.prepare_s)
        decoded = DecodedImage([], outcome.format, outcome.width, outcome.height, outcome.frame_count)
        done: Future[FrameResult] = Future()
        done.set_result(outcome.result)
        self._finish(job, decoded, [done])

    def _decode_and_prepare(self, job: _Job, data: bytes) -> tuple[DecodedImage, list[PreparedFrame]]:
        """Baseline JPEGs decode on this thread (bounded by the pixel cap, and a draft
        decode is small); progressive/multi-scan JPEGs (a pass per scan), animated and other
        formats in a decode process with a hard time limit, which sends back the
        detectors' inputs rather than the frames."""
        info = probe(data)
        if self._decode_procs is None or not data or info.baseline_jpeg:
            t = time.perf_counter()
            try:
                decoded = decode_image(data, self.settings.decode, self._draft_side, info)
            finally:
                job.timings["decode_ms"] = _ms(time.perf_counter() - t)
            t = time.perf_counter()
            if job.hashes is not None and self._pdq:
                orientation = decoded.frames[0].orientation if decoded.frames else 1
                job.hashes = with_pdq(job.hashes, [frame.image for frame in decoded.frames], orientation)
            job.timings["hash_ms"] = job.timings.get("hash_ms", 0.0) + _ms(time.perf_counter() - t)
            t = time.perf_counter()
            prepared = [PreparedFrame(None, self._prepare(frame)) for frame in decoded.frames]
            job.timings["prepare_ms"] = _ms(time.perf_counter() - t)
            # Every input is prepared: the full-size frames go now rather than wait for the
            # batch (a batch of 12 MP photos held ~0.8 GB, faulted in afresh each time).
            kept = DecodedImage([], decoded.format, decoded.width, decoded.height, decoded.frame_count)
            return kept, prepared
        t = time.perf_counter()
        try:
            out = self._decode_procs.run(data, info)
        finally:
            job.timings["decode_ms"] = _ms(time.perf_counter() - t)
        # The child's preprocessing belongs to prepare_ms, as on the thread path.
        job.timings["decode_ms"] = _ms(max(0.0, time.perf_counter() - t - out.prepare_s))
        t = time.perf_counter()
        prepared = []
        pdqs = tuple(item.inputs.pop(PDQ_KEY) for item in out.frames if PDQ_KEY in item.inputs)
        stored = [item.inputs.pop(PDQ_FILE_KEY, None) for item in out.frames]
        if job.hashes is not None and pdqs:
            job.hashes = job.hashes.with_pdqs(pdqs, stored[0])
        for item in out.frames:
            inputs = item.inputs
            if self._parent_keys and item.frame is not None:
                inputs = {**inputs, **self._prepare(item.frame, self._parent_keys)}
            prepared.append(PreparedFrame(None, inputs))
        job.timings["prepare_ms"] = _ms(out.prepare_s + time.perf_counter() - t)
        # The frames stayed in the decode process; only their count matters from here on.
        return DecodedImage([], out.format, out.width, out.height, out.frame_count), prepared

    def _preparers(self) -> tuple[Preparers, list[str]]:
        """Picklable preparers for the decode processes, and the input keys whose
        detector has none (prepared here, on the frame sent back)."""
        preparers: Preparers = {}
        parent: list[str] = []
        sources: list[tuple[str, Any]] = []
        if self.detectors.backbone is not None:
            sources.append((CLIP, self.detectors.backbone))
        sources += [(d.id, d) for d in self.detectors.detectors if d.input == "image"]
        for key, owner in sources:
            make = getattr(owner, "preparer", None)
            fn = make() if make is not None else None
            if fn is not None:
                try:
                    pickle.dumps(fn)
                except Exception as exc:
                    log.warning("%s: preparer cannot go to a decode process (%s); preparing here", key, exc)
                    fn = None
            if fn is None:
                parent.append(key)
            else:
                preparers[key] = fn
        if self._pdq:
            preparers[PDQ_KEY] = frame_pdq  # hashed where the frame is: in the decode process
            preparers[PDQ_FILE_KEY] = frame_pdq_file
        return preparers, parent

    def _prepare(self, frame: Frame, keys: Sequence[str] | None = None) -> dict[str, Any]:
        """Every detector's input for ``frame`` (only ``keys`` when given)."""
        return prepare_inputs(self.detectors, frame, keys)

    def _finish(self, job: _Job, decoded: DecodedImage, futures: list[Future[FrameResult]]) -> None:
        t = time.perf_counter()
        results = [f.result() for f in futures]
        job.timings["queue_ms"] = max(r.queue_ms for r in results)
        job.timings["infer_ms"] = max(r.infer_ms for r in results)
        failures = {d: msg for r in results for d, msg in r.errors.items()}
        detectors: dict[str, DetectorResult] = {}
        silent: set[str] = set()  # no output for some frame (any error returns below first)
        for det in self.detectors.detectors:
            per_frame = [r.outputs[det.id] for r in results if det.id in r.outputs]
            if len(per_frame) < len(results):
                silent.add(det.id)
            if per_frame:
                fused = fuse_frames(per_frame)
                detectors[det.id] = DetectorResult(
                    model=det.model, revision=det.revision, scores=fused.scores, details=fused.details
                )
        image = _image_info(decoded)
        if failures:
            message = "; ".join(f"{d}: {m}" for d, m in sorted(failures.items()))
            self._fail(
                job, ErrorCode.DETECTOR_FAILED, message, detectors=detectors, frames=len(results), image=image
            )
            return
        # A frame a detector skipped must not count as a 0.0 frame: its scores are left out,
        # and the aggregator refuses the image if the policy uses that detector.
        scored = {k: v.scores for k, v in detectors.items() if k not in silent}
        if self._judge(job, detectors, scored, image, len(results), t) and not silent:
            self._remember(job, detectors, image, len(results))

    def _judge(
        self,
        job: _Job,
        detectors: dict[str, DetectorResult],
        scored: dict[str, dict[str, float]],
        image: ImageInfo,
        frames: int,
        t: float,
        cached_from: str | None = None,
    ) -> bool:
        """Scores (and bank matches) → the job's verdict; False when it became an error."""
        try:
            assessment = assess(scored, job.policy, self._loaded_ids)
        except MissingScoresError as exc:
            self._fail(
                job,
                ErrorCode.DETECTOR_FAILED,
                str(exc),
                detectors=detectors,
                frames=frames,
                image=image,
            )
            return False
        assessment = apply_matches(assessment, job.matches)
        job.timings["aggregate_ms"] = _ms(time.perf_counter() - t)
        job.timings["total_ms"] = _ms(time.perf_counter() - job.started)
        job.future.set_result(
            job.ok_verdict(
                assessment, detectors=detectors, image=image, frames=frames, cached_from=cached_from
            )
        )
        return True

    # -- the score cache ----------------------------------------------------------------

    def _cached(self, job: _Job) -> bool:
        """A repeat of bytes already scored: its verdict from the cached scores. True if so."""
        if self._cache is None or job.hashes is None:
            return False
        job.cache_key = cache_key(job.hashes.sha256, job.policy.version, self._detector_sig, self._decode_sig)
        hit = self._cache.get(job.cache_key)
        metrics.SCORE_CACHE.labels("hit" if hit is not None else "miss").inc()
        if hit is None:
            return False
        t = time.perf_counter()
        if hit.frame_pdqs:
            job.hashes = job.hashes.with_pdqs(hit.frame_pdqs, hit.pdq_file)
            self._match_pdq(job)  # banks as they stand now: matches are never cached
        scored = {k: v.scores for k, v in hit.detectors.items()}
        self._judge(job, dict(hit.detectors), scored, hit.image, hit.frames, t, cached_from=hit.verdict_id)
        return True

    def _near_context(self, job: _Job) -> str:
        # What a near duplicate must share with the cached image: all of the key but the bytes.
        return cache_key("", job.policy.version, self._detector_sig, self._decode_sig)

    def _single_pdq(self, job: _Job) -> tuple[str, int] | None:
        """The one PDQ of a still image: only those are reused across near duplicates (an
        animation could differ in any frame)."""
        if job.hashes is None or len(job.hashes.frame_pdqs) != 1:
            return None
        return job.hashes.frame_pdqs[0]

    def _near_cached(self, job: _Job, decoded: DecodedImage) -> bool:
        """With ``cache.near_duplicate_bits``: an image within that many PDQ bits of a
        cached still image reuses its scores (its own hashes and bank matches stay). True if so."""
        bits, cache = self.settings.cache.near_duplicate_bits, self._cache
        single = self._single_pdq(job)
        if cache is None or cache.near is None or bits is None or single is None or decoded.frame_count != 1:
            return False
        t = time.perf_counter()
        found = cache.near.find(self._near_context(job), single[0], single[1], bits)
        hit = cache.get(found[0]) if found is not None else None
        if hit is None or hit.frames != 1:
            metrics.SCORE_CACHE.labels("near_miss").inc()
            return False
        metrics.SCORE_CACHE.labels("near_hit").inc()
        log.info("%s: scores reused from %s (PDQ %d bits away)", job.source.uri, hit.verdict_id, found[1])
        scored = {k: v.scores for k, v in hit.detectors.items()}
        image = _image_info(decoded)
        self._judge(job, dict(hit.detectors), scored, image, 1, t, cached_from=hit.verdict_id)
        return True

    def _remember(
        self, job: _Job, detectors: dict[str, DetectorResult], image: ImageInfo, frames: int
    ) -> None:
        if self._cache is None or job.cache_key is None or job.hashes is None:
            return
        entry = CachedScores(
            verdict_id(job.source, job.policy.version),
            detectors,
            image,
            frames,
            job.hashes.frame_pdqs,
            job.hashes.pdq_file,
        )
        self._cache.put(job.cache_key, entry)
        metrics.SCORE_CACHE.labels("stored").inc()
        single = self._single_pdq(job)
        if self._cache.near is not None and single is not None and frames == 1:
            self._cache.near.add(self._near_context(job), single[0], single[1], job.cache_key)

    def _fail(self, job: _Job, code: ErrorCode, message: str, **extra: object) -> None:
        if job.future.done():
            return
        job.timings["total_ms"] = _ms(time.perf_counter() - job.started)
        verdict = error_verdict(
            job.source,
            job.policy.version,
            code,
            message,
            timings_ms=job.timings,
            request_id=job.request_id,
            hashes=job.hashes_block(),
            matches=job.matches,
            **extra,
        )
        job.future.set_result(with_error_decision(verdict, job.policy))


def _image_info(decoded: DecodedImage) -> ImageInfo:
    return ImageInfo(
        format=decoded.format, width=decoded.width, height=decoded.height, frame_count=decoded.frame_count
    )
