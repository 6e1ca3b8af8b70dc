"""Decode processes: decoding and detector preprocessing in child processes with a hard
time limit, so a decoder that hangs, crashes or runs away costs one image, not the worker.

Each slot is one long-lived child (forkserver context: forking the worker itself after
torch and threads started is unsafe) that receives an image's bytes and sends back only
the detector-sized inputs (``Detector.preparer``), plus the decoded frame where some
detector must prepare in the parent. A child that exceeds ``decode.max_decode_s`` is
killed and replaced, and the image gets ``image_too_complex``. Each child's address space
is capped at its size after start-up plus ``decode.process_memory_mb`` (RLIMIT_AS): an
image that needs more gets ``image_too_large`` and the child is replaced, rather than the
node's OOM killer choosing a victim. The pool is a handful of lines of our own rather than
``ProcessPoolExecutor``, which turns Broken for every caller once one child is killed.

As with any spawn/forkserver child, a script that builds a Pipeline must guard its entry
point with ``if __name__ == "__main__":`` (the child imports the main module).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import pickle
import queue
import resource
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from modgate.errors import ErrorCode, ModerationError
from modgate.settings import DecodeSettings, RuntimeSettings
from worker.ingest.decode import Frame, decode_image
from worker.ingest.probe import Probe
from worker.runtime import configure_threads

log = logging.getLogger(__name__)

# Preparers: key (detector id, or the CLIP backbone's key) → picklable Frame → input.
Preparers = dict[str, Callable[[Frame], Any]]
# What a child runs per image: (data, probe, settings, min_side, preparers, keep_frames).
Job = Callable[[bytes, Probe, DecodeSettings, int, Preparers, bool], "Decoded"]

# A child's start (imports, unpickling the preparers) is not charged to an image.
_START_TIMEOUT_S = 120.0
# Past the budget the child would have stopped itself between frames; this grace lets it
# say so instead of being killed (and re-forked) for being a few milliseconds late.
_KILL_GRACE_S = 1.0


@dataclass(frozen=True)
class PreparedInputs:
    """One sampled frame as it comes back from a child."""

    index: int
    scale: float
    inputs: dict[str, Any]
    frame: Frame | None  # only when some detector prepares in the parent


@dataclass(frozen=True)
class Decoded:
    format: str
    width: int
    height: int
    frame_count: int
    frames: list[PreparedInputs]
    decode_s: float
    prepare_s: float


def decode_and_prepare(
    data: bytes, info: Probe, settings: DecodeSettings, min_side: int, preparers: Preparers, keep_frames: bool
) -> Decoded:
    """The child's work for one image: decode (budget included), then every preparer."""
    t = time.perf_counter()
    decoded = decode_image(data, settings, min_side, info)
    decode_s = time.perf_counter() - t
    t = time.perf_counter()
    frames = []
    for frame in decoded.frames:
        inputs = {}
        for key, prepare in preparers.items():
            try:
                inputs[key] = prepare(frame)
            except MemoryError:
                raise  # the image's size, not the detector: image_too_large (_child_main)
            except Exception as exc:
                raise ModerationError(
                    ErrorCode.DETECTOR_FAILED, f"{key}: preprocessing failed: {type(exc).__name__}: {exc}"
                ) from None
        frames.append(PreparedInputs(frame.index, frame.scale, inputs, frame if keep_frames else None))
    return Decoded(
        decoded.format,
        decoded.width,
        decoded.height,
        decoded.frame_count,
        frames,
        decode_s,
        time.perf_counter() - t,
    )


def _warm_up(preparers: Preparers) -> None:
    """Run each preparer once on a small frame, so the libraries they import lazily (cv2...)
    load before the first image, not within its time limit."""
    from PIL import Image

    frame = Frame(Image.new("RGB", (64, 48), (128, 128, 128)), 1.0)
    for prepare in preparers.values():
        with contextlib.suppress(Exception):
            prepare(frame)


def _address_space() -> int | None:
    """This process's virtual size in bytes (what RLIMIT_AS counts); None off Linux."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _cap_memory(memory_mb: int) -> None:
    """Cap the address space at its size now (libraries loaded, warmed up) plus
    ``memory_mb``: a fixed cap would have to guess that size, which torch alone makes
    several GB of mostly unbacked mappings."""
    size = _address_space()
    if memory_mb <= 0 or size is None:
        return
    limit = size + memory_mb * 1024 * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _out_of_memory(exc: BaseException | None) -> bool:
    """Whether ``exc`` is, or was raised while handling, a MemoryError (decode_image turns
    one into a coded ModerationError)."""
    seen = 0
    while exc is not None and seen < 16:
        if isinstance(exc, MemoryError):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _child_main(
    conn: Connection, job: Job, args: tuple[Any, ...], preparers: Preparers, memory_mb: int
) -> None:
    # Ctrl-C goes to the whole process group; the parent decides when children stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # One image at a time in each child: the children are the parallelism, so the native
    # libraries' own pools (OpenCV, torch) would only contend with them for the cores.
    configure_threads(RuntimeSettings(threads=1, preprocess_threads=1))
    _warm_up(preparers)
    _cap_memory(memory_mb)  # before the first image, after the imports it must not charge
    oom = "over decode.process_memory_mb" if memory_mb > 0 else "the host is out of memory"
    conn.send_bytes(b"ready")
    while True:
        # A reply is (ok, result or (code, message), retire): after a MemoryError the child
        # answers and exits (a C library that failed an allocation may have leaked or left
        # state behind), and the parent starts a fresh one.
        try:
            message = conn.recv_bytes()
            if not message:
                return  # shutdown
            data, info = pickle.loads(message)
        except (EOFError, OSError):
            return  # the parent is gone
        except MemoryError:
            conn.send_bytes(pickle.dumps((False, (ErrorCode.IMAGE_TOO_LARGE.value, oom), True)))
            return
        retire = False
        try:
            result: tuple[bool, Any, bool] = (True, job(data, info, *args), False)
        except ModerationError as exc:
            retire = _out_of_memory(exc)
            text = f"{exc.message} ({oom})" if retire else exc.message
            result = (False, (exc.code.value, text), retire)
        except MemoryError:
            retire = True
            result = (False, (ErrorCode.IMAGE_TOO_LARGE.value, f"ran out of memory ({oom})"), True)
        except BaseException as exc:  # a hostile file may make a decoder raise anything
            result = (False, (ErrorCode.INTERNAL.value, f"{type(exc).__name__}: {exc}"), False)
        try:
            # Plain pickle, not multiprocessing's: torch tensors go by value, not as
            # shared-memory handles that would outlive this call.
            out = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            retire = retire or _out_of_memory(exc)
            failed = (ErrorCode.INTERNAL.value, f"result cannot be sent back: {type(exc).__name__}: {exc}")
            out = pickle.dumps((False, failed, retire))
        conn.send_bytes(out)
        if retire:
            return


class _Child:
    def __init__(
        self, ctx: Any, job: Job, args: tuple[Any, ...], preparers: Preparers, memory_mb: int
    ) -> None:
        self.conn, child_conn = ctx.Pipe(duplex=True)
        self.process = ctx.Process(
            target=_child_main,
            args=(child_conn, job, args, preparers, memory_mb),
            name="modgate-decode",
            daemon=True,
        )
        self.process.start()
        child_conn.close()
        self.ready = False
        self.retired = False  # ran out of memory: answered, and exits

    def call(self, data: bytes, info: Probe, limit_s: float) -> Decoded:
        if not self.ready:
            if not self.conn.poll(_START_TIMEOUT_S):
                self.kill()
                raise RuntimeError("decode process did not start")
            self.conn.recv_bytes()
            self.ready = True
        self.conn.send_bytes(pickle.dumps((data, info), protocol=pickle.HIGHEST_PROTOCOL))
        if not self.conn.poll(limit_s + _KILL_GRACE_S):
            self.kill()
            raise ModerationError(
                ErrorCode.IMAGE_TOO_COMPLEX,
                f"decoding took over {limit_s:g} s; the decode process was stopped",
            )
        ok, payload, self.retired = pickle.loads(self.conn.recv_bytes())
        if ok:
            return payload
        code, message = payload
        raise ModerationError(ErrorCode(code), message)

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)
        self.conn.close()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send_bytes(b"")
        self.process.join(2)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(2)
        self.conn.close()


class DecodeProcesses:
    """``workers`` decode processes; ``run`` borrows one per image (blocking while all are
    busy, as the decode threads that call it are as many as the processes)."""

    def __init__(
        self,
        workers: int,
        settings: DecodeSettings,
        min_side: int,
        preparers: Preparers,
        keep_frames: bool,
        job: Job = decode_and_prepare,
    ) -> None:
        self._ctx = multiprocessing.get_context("forkserver")
        # The fork server imports these once (the main module too, which every child
        # would otherwise import again); each child then forks ready to work.
        modules = {"__main__", "worker.ingest.decode_pool", job.__module__}
        for prepare in preparers.values():
            modules.add(getattr(prepare, "func", prepare).__module__)
            # A partial's bound objects (an image processor) bring their own modules.
            bound = [*getattr(prepare, "args", ()), *getattr(prepare, "keywords", {}).values()]
            modules.update(type(value).__module__ for value in bound if type(value).__module__ != "builtins")
        self._ctx.set_forkserver_preload(sorted(modules))
        self._job = job
        self._preparers = preparers
        self._args = (settings, min_side, preparers, keep_frames)
        self._limit_s = settings.max_decode_s
        self._memory_mb = settings.process_memory_mb
        self._slots: queue.Queue[_Child | None] = queue.Queue()
        for _ in range(workers):
            # Started now, so the first images do not wait for them; replaced on first
            # use after one is lost.
            self._slots.put(self._start())
        self._workers = workers
        self._closed = False

    def run(self, data: bytes, info: Probe) -> Decoded:
        """Decode and prepare ``data`` in a child; ModerationError for the image's failures."""
        child = self._slots.get()
        try:
            if self._closed:
                raise RuntimeError("decode processes are closed")
            if child is not None and not child.process.is_alive():
                # Died while idle (OOM killer, an operator): not this image's fault.
                log.warning("decode process %s died while idle; replacing it", child.process.pid)
                child.kill()
                child = None
            if child is None:
                child = self._start()
            try:
                return child.call(data, info, self._limit_s)
            except (EOFError, OSError, pickle.UnpicklingError):
                child.kill()
                exitcode = child.process.exitcode
                child = None
                log.warning("decode process died (exit code %s); replacing it", exitcode)
                raise self._died_error(exitcode) from None
            except ModerationError:
                if child.retired:
                    log.warning("decode process ran out of memory; replacing it")
                    child.stop()
                    child = None
                elif not child.process.is_alive():  # killed past the time limit
                    log.warning("decode process stopped after %.1f s; replacing it", self._limit_s)
                    child = None
                raise
            except RuntimeError:
                child = None
                raise
        finally:
            self._slots.put(child)

    def _start(self) -> _Child:
        return _Child(self._ctx, self._job, self._args, self._preparers, self._memory_mb)

    @staticmethod
    def _died_error(exitcode: int | None) -> ModerationError:
        if exitcode == -signal.SIGKILL:
            # Most likely the kernel's OOM killer: the image needed more memory than we have.
            return ModerationError(
                ErrorCode.IMAGE_TOO_COMPLEX, "the decode process was killed (out of memory?)"
            )
        return ModerationError(ErrorCode.CORRUPT_IMAGE, f"the decoder crashed (exit code {exitcode})")

    def pids(self) -> list[int]:
        """Process ids of the started children (tests, health)."""
        found = []
        for _ in range(self._workers):
            child = self._slots.get()
            if child is not None and child.process.pid is not None:
                found.append(child.process.pid)
            self._slots.put(child)
        return found

    def close(self) -> None:
        self._closed = True
        for _ in range(self._workers):
            child = self._slots.get()
            if child is not None:
                child.stop()
            self._slots.put(None)
