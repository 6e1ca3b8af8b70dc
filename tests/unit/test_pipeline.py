"""The pipeline wires real stages; the detectors here are the real Open-NSFW model plus,
where a test needs a detector to fail, a small double defined in this file."""

import io
import os
import threading
import time
from collections.abc import Sequence

import pytest
from PIL import Image

from modgate.errors import ErrorCode
from modgate.settings import load_settings
from modgate.verdict import Source
from tests.helpers import wait_for
from worker.detectors import LoadedDetectors
from worker.detectors.base import Detector, DetectorOutput
from worker.detectors.open_nsfw import OpenNSFW
from worker.ingest.fetch import Fetcher
from worker.pipeline import Cancel, Cancelled, Pipeline, _Turns


class ExplodesOnRed(Detector):
    """Fails on frames whose top-left pixel is pure red, to prove isolation."""

    id = "explodes_on_red"
    min_side = 0
    model = "test/explodes"
    revision = "1"

    @classmethod
    def load(cls, settings):
        return cls()

    def infer(self, frames: Sequence) -> list[DetectorOutput]:
        if any(f.image.getpixel((0, 0)) == (255, 0, 0) for f in frames):
            raise RuntimeError("red frame")
        return [DetectorOutput({"score": 0.0}) for _ in frames]


def write(path, color, size=(320, 240), fmt="PNG"):
    Image.new("RGB", size, color).save(path, fmt)
    return path


def file_source(path) -> Source:
    return Source(kind="file", uri=str(path), path=str(path))


@pytest.fixture(scope="module")
def settings():
    return load_settings(batch={"max_batch": 8, "max_wait_ms": 20})


@pytest.fixture(scope="module")
def open_nsfw(settings):
    return OpenNSFW.load(settings)


def test_one_verdict_per_image_with_scores_and_timings(tmp_path, settings, open_nsfw):
    paths = [write(tmp_path / f"{i}.png", (i * 20, 100, 50)) for i in range(10)]
    with Pipeline(settings, LoadedDetectors([open_nsfw], {})) as pipe:
        verdicts = list(pipe.moderate(file_source(p) for p in paths))
    assert sorted(v.source.path for v in verdicts) == sorted(map(str, paths))
    for v in verdicts:
        assert v.status == "ok" and v.decision in ("safe", "review", "unsafe")
        assert 0.0 <= v.detectors["open_nsfw"].scores["nsfw"] <= 1.0
        assert set(v.timings_ms) >= {"fetch_ms", "decode_ms", "queue_ms", "infer_ms", "total_ms"}
        assert v.image.width == 320 and v.frames == 1
        assert v.categories["sexual"].covered and not v.categories["violence"].covered
    assert pipe.engine._batcher.batches_run < 10  # they were batched, not run one by one


def test_a_detector_failure_costs_only_its_image(tmp_path, settings, open_nsfw):
    good = [write(tmp_path / f"g{i}.png", (0, 0, 255)) for i in range(5)]
    bad = write(tmp_path / "red.png", (255, 0, 0))
    detectors = LoadedDetectors([open_nsfw, ExplodesOnRed()], {})
    with Pipeline(settings, detectors) as pipe:
        verdicts = {v.source.path: v for v in pipe.moderate(file_source(p) for p in [*good, bad])}
    assert verdicts[str(bad)].status == "error"
    assert verdicts[str(bad)].error.code == ErrorCode.DETECTOR_FAILED
    assert "explodes_on_red" in verdicts[str(bad)].error.message
    assert all(verdicts[str(p)].status == "ok" for p in good)


def test_bad_inputs_become_error_verdicts(tmp_path, settings, open_nsfw):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_bytes(b"hello")
    buf = io.BytesIO()
    Image.new("RGB", (400, 300), (9, 9, 9)).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[:200])
    sources = [file_source(tmp_path / n) for n in ("empty.jpg", "text.jpg", "cut.jpg", "missing.jpg")]
    with Pipeline(settings, LoadedDetectors([open_nsfw], {})) as pipe:
        codes = {v.source.uri.rsplit("/", 1)[1]: v.error.code for v in pipe.moderate(sources)}
    assert codes == {
        "empty.jpg": ErrorCode.EMPTY_OBJECT,
        "text.jpg": ErrorCode.UNSUPPORTED_FORMAT,
        "cut.jpg": ErrorCode.CORRUPT_IMAGE,
        "missing.jpg": ErrorCode.NOT_FOUND,
    }


def test_animation_is_as_unsafe_as_its_worst_frame(tmp_path, settings, open_nsfw):
    frames = [Image.new("RGB", (256, 256), (i * 30, 80, 200 - i * 20)) for i in range(6)]
    anim = tmp_path / "anim.gif"
    frames[0].save(anim, save_all=True, append_images=frames[1:], duration=50)
    stills = []
    for i, frame in enumerate(frames):
        stills.append(tmp_path / f"f{i}.gif")
        frame.save(stills[-1])
    with Pipeline(settings, LoadedDetectors([open_nsfw], {})) as pipe:
        by_path = {v.source.path: v for v in pipe.moderate(file_source(p) for p in [anim, *stills])}
    animated = by_path[str(anim)]
    assert animated.frames == 6 and animated.image.frame_count == 6
    worst = max(by_path[str(p)].detectors["open_nsfw"].scores["nsfw"] for p in stills)
    assert animated.detectors["open_nsfw"].scores["nsfw"] == pytest.approx(worst, abs=1e-6)


# -- a loaded detector that returns no score ---------------------------------------------


class Nudity(Detector):
    """A stand-in for ``nudenet`` (an id the default policy's evidence uses): scores 0.9,
    or nothing at all on frames whose top-left pixel is pure green."""

    id = "nudenet"
    min_side = 0
    model = "test/nudity"
    revision = "1"

    @classmethod
    def load(cls, settings):
        return cls()

    def infer(self, frames: Sequence) -> list[DetectorOutput]:
        return [
            DetectorOutput({} if f.image.getpixel((0, 0)) == (0, 255, 0) else {"sexual": 0.9}) for f in frames
        ]


class DroppingEngine:
    """An engine double for the split shape: a ``LocalEngine`` whose replies lose one
    detector's output, as a remote engine's reply might."""

    tensor = False

    def __init__(self, inner, drop: str) -> None:
        self.inner, self.drop, self.detectors = inner, drop, inner.detectors

    def submit_frame(self, frame):
        from concurrent.futures import Future
        from dataclasses import replace

        out = Future()

        def relay(f):
            result = f.result()
            out.set_result(
                replace(result, outputs={k: v for k, v in result.outputs.items() if k != self.drop})
            )

        self.inner.submit_frame(frame).add_done_callback(relay)
        return out

    def submit_jpeg(self, data, cancel=None):
        raise RuntimeError("no tensor path")

    def alive(self):
        return self.inner.alive()

    def close(self):
        self.inner.close()


def test_a_loaded_detector_without_a_score_fails_its_image(tmp_path, settings, open_nsfw):
    blue = write(tmp_path / "blue.png", (0, 0, 255))
    green = write(tmp_path / "green.png", (0, 255, 0))
    with Pipeline(settings, LoadedDetectors([open_nsfw, Nudity()], {})) as pipe:
        verdicts = {v.source.path: v for v in pipe.moderate(file_source(p) for p in [blue, green])}
    assert verdicts[str(blue)].status == "ok" and verdicts[str(blue)].decision == "unsafe"
    silent = verdicts[str(green)]
    assert silent.status == "error" and silent.error.code == ErrorCode.DETECTOR_FAILED
    assert "nudenet" in silent.error.message and silent.decision is None


@pytest.mark.parametrize("drop", [None, "nudenet"])
def test_split_shape_an_engine_reply_without_a_detector_fails_its_image(tmp_path, settings, open_nsfw, drop):
    from worker.device.engine import LocalEngine

    blue = write(tmp_path / "blue.png", (0, 0, 255))
    inner = LocalEngine(settings, LoadedDetectors([open_nsfw, Nudity()], {}), None)
    engine = inner if drop is None else DroppingEngine(inner, drop)
    with Pipeline(settings, engine=engine) as pipe:
        (verdict,) = pipe.moderate([file_source(blue)])
    if drop is None:
        assert verdict.status == "ok" and verdict.decision == "unsafe"
    else:
        assert verdict.status == "error" and verdict.error.code == ErrorCode.DETECTOR_FAILED
        assert "nudenet" in verdict.error.message


# -- backpressure and cancellation ------------------------------------------------------


class Gate(Detector):
    """An image detector whose ``prepare`` (run on the decode threads) waits for ``gate``:
    work piles up in front of it exactly as it does behind a slow model."""

    id = "gate"
    min_side = 0
    model = "test/gate"
    revision = "1"

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.prepared = 0

    @classmethod
    def load(cls, settings):
        return cls()

    def prepare(self, frame):
        self.prepared += 1
        self.entered.set()
        self.gate.wait()
        return frame

    def infer(self, frames: Sequence) -> list[DetectorOutput]:
        return [DetectorOutput({"score": 0.0}) for _ in frames]


class CountingFetcher(Fetcher):
    def __init__(self, settings):
        super().__init__(settings)
        self.fetched = 0
        self.lock = threading.Lock()

    def fetch(self, source, cancel=None):
        with self.lock:
            self.fetched += 1
        return super().fetch(source, cancel)


def jpegs(tmp_path, n):
    return [file_source(write(tmp_path / f"{i}.jpg", (i * 20, 90, 40), fmt="JPEG")) for i in range(n)]


def waiting_on(budget) -> int:
    return len(budget._cond._waiters)  # threads blocked in _Budget.acquire


def gated_pipeline(worker, **decode):
    settings = load_settings(batch={"max_batch": 4, "max_wait_ms": 1}, worker=worker, decode={"workers": 1})
    gate = Gate()
    fetcher = CountingFetcher(settings.s3)
    return Pipeline(settings, LoadedDetectors([gate], {}), fetcher=fetcher), gate, fetcher


def test_submit_blocks_at_the_in_flight_cap_and_nothing_more_is_fetched(tmp_path):
    sources = jpegs(tmp_path, 6)
    pipe, gate, fetcher = gated_pipeline({"max_inflight": 2})
    futures = []
    submitter = threading.Thread(target=lambda: futures.extend(pipe.submit(s) for s in sources))
    submitter.start()
    wait_for(lambda: waiting_on(pipe._slots) == 1 and fetcher.fetched == 2, what="a full pipeline")
    # The third submit is waiting for a slot: two images in flight, nothing else fetched.
    assert submitter.is_alive() and pipe._slots.used == 2 and fetcher.fetched == 2
    gate.gate.set()
    submitter.join(30)
    verdicts = [f.result(30) for f in futures]
    assert len(verdicts) == 6 and all(v.status == "ok" for v in verdicts)
    assert pipe._slots.used == 0 and fetcher.fetched == 6
    pipe.close()


def test_fetched_bytes_waiting_for_decode_stay_under_the_cap(tmp_path):
    sources = jpegs(tmp_path, 5)
    size = max(os.path.getsize(s.path) for s in sources)
    pipe, gate, _ = gated_pipeline({"max_inflight": 50, "max_buffered_bytes": int(size * 1.5)})
    futures = [pipe.submit(s) for s in sources]  # does not block: room for 50
    # One image is in the (only) decode thread, holding its bytes; the next fetched one
    # does not fit beside it, so its fetch thread waits instead of queueing more bytes.
    wait_for(lambda: gate.entered.is_set() and waiting_on(pipe._buffered) >= 1, what="the byte cap")
    assert pipe._buffered.used <= size * 1.5
    gate.gate.set()
    assert all(f.result(30).status == "ok" for f in futures)
    assert pipe._buffered.used == 0
    pipe.close()


def test_cancelled_work_stops_at_the_next_stage_and_frees_its_slots(tmp_path):
    sources = jpegs(tmp_path, 4)
    pipe, gate, _ = gated_pipeline({"max_inflight": 10})
    cancel = Cancel()
    futures = [pipe.submit(s, cancel=cancel) for s in sources]
    wait_for(gate.entered.is_set, what="the first image in prepare")
    cancel.set()
    gate.gate.set()
    for f in futures:
        with pytest.raises(Cancelled):
            f.result(30)
    assert gate.prepared == 1  # the three waiting for the decode thread never ran it
    assert pipe._slots.used == 0 and pipe._buffered.used == 0
    # A cancelled submitter waiting for a slot gives up instead of waiting forever.
    full, gate2, _ = gated_pipeline({"max_inflight": 1})
    first = full.submit(sources[0])
    late = full.submit(sources[1], cancel=Cancel(deadline=time.monotonic()))
    with pytest.raises(Cancelled):
        late.result(0)
    gate2.gate.set()
    assert first.result(30).status == "ok"
    pipe.close()
    full.close()


def test_messages_are_admitted_first_come_first_served():
    pipe_turns = _Turns()
    order = []
    first = pipe_turns.take(None)
    threads = []
    for i in range(5):

        def enter(i=i):
            me = pipe_turns.take(None)
            order.append(i)
            pipe_turns.give(me)

        t = threading.Thread(target=enter)
        threads.append(t)
        t.start()
        wait_for(lambda n=i + 2: len(pipe_turns._queue) == n, what="the waiter queued")
    gone = Cancel()
    gone.set()
    assert pipe_turns.take(gone) is None  # a cancelled waiter leaves the line
    pipe_turns.give(first)
    for t in threads:
        t.join(10)
    assert order == [0, 1, 2, 3, 4]


# -- decode processes (issue 10, decode budget) -----------------------------------------


def hang_on_marker(data, info, *args):
    """Decode-process job for tests: bytes starting with b"HANG" never finish."""
    from worker.ingest.decode_pool import decode_and_prepare

    if data.startswith(b"HANG"):
        time.sleep(3600)
    return decode_and_prepare(data, info, *args)


def mixed_inputs(tmp_path):
    from worker.tools.samples import photo

    paths = []
    for i, fmt in enumerate(["PNG", "WEBP", "PNG", "BMP"]):
        paths.append(tmp_path / f"still{i}.{fmt.lower()}")
        photo(300, 220, 40 + i).save(paths[-1], fmt)
    for fmt in ("GIF", "WEBP", "PNG"):
        frames = [photo(200, 150, 60 + k) for k in range(5)]
        paths.append(tmp_path / f"anim.{fmt.lower()}")
        frames[0].save(paths[-1], fmt, save_all=True, append_images=frames[1:], duration=40, loop=0)
    paths.append(tmp_path / "photo.jpg")
    photo(640, 480, 70).save(paths[-1], "JPEG")
    return paths


def test_decode_processes_give_the_scores_of_the_thread_path(tmp_path, open_nsfw):
    paths = mixed_inputs(tmp_path)
    by_mode = {}
    for processes in (False, True):
        settings = load_settings(batch={"max_batch": 8, "max_wait_ms": 20}, decode={"processes": processes})
        with Pipeline(settings, LoadedDetectors([open_nsfw], {})) as pipe:
            assert (pipe._decode_procs is not None) == processes
            verdicts = list(pipe.moderate(file_source(p) for p in paths))
            if processes:
                assert len(pipe._decode_procs.pids()) == settings.decode.workers
        by_mode[processes] = {
            v.source.path: (v.status, v.frames, v.image.frame_count, v.detectors["open_nsfw"].scores)
            for v in verdicts
        }
    assert all(status == "ok" for status, *_ in by_mode[True].values())
    assert by_mode[True] == by_mode[False]  # same inputs to the model, same scores, exactly


def test_bombs_and_hanging_decodes_cost_only_their_image(tmp_path, open_nsfw):
    from tests.unit.test_decode import bomb_gif
    from worker.ingest.decode_pool import DecodeProcesses

    good = [write(tmp_path / f"g{i}.png", (i * 40, 90, 200)) for i in range(4)]
    (tmp_path / "bomb.gif").write_bytes(bomb_gif())
    (tmp_path / "hangs.png").write_bytes(b"HANG" + b"\x00" * 100)
    settings = load_settings(batch={"max_batch": 8, "max_wait_ms": 20}, decode={"max_decode_s": 0.5})
    with Pipeline(settings, LoadedDetectors([open_nsfw], {})) as pipe:
        # The decode processes again, running a job that hangs on the marker.
        pipe._decode_procs.close()
        preparers, _ = pipe._preparers()
        pipe._decode_procs = DecodeProcesses(
            settings.decode.workers, settings.decode, 0, preparers, False, job=hang_on_marker
        )
        pids = set(pipe._decode_procs.pids())
        sources = [file_source(p) for p in [tmp_path / "hangs.png", tmp_path / "bomb.gif", *good]]
        verdicts = {v.source.path: v for v in pipe.moderate(sources)}
        assert set(pipe._decode_procs.pids()) != pids  # the hung one was replaced
    for name in ("hangs.png", "bomb.gif"):
        assert verdicts[str(tmp_path / name)].error.code == ErrorCode.IMAGE_TOO_COMPLEX
    assert all(verdicts[str(p)].status == "ok" for p in good)


def test_torch_detectors_prepare_in_decode_processes_with_the_same_scores(tmp_path):
    """The CLIP backbone's and Falconsai's preparers (torch, transformers) in a child."""
    from tests.conftest import SHARED
    from tests.models import tiny_clip, tiny_falconsai
    from worker.detectors import load_detectors

    paths = {
        "clip": str(tiny_clip(tmp_path / "clip")),
        "clip_zeroshot": str(SHARED / "models" / "unsafebench" / "categories.txt"),
        "falconsai_vit": str(tiny_falconsai(tmp_path / "falconsai")),
    }
    images = [p for p in mixed_inputs(tmp_path) if p.name in ("still0.png", "anim.gif", "anim.webp")]
    base = load_settings(detectors={"enabled": ["clip_zeroshot", "falconsai_vit"], "paths": paths})
    detectors = load_detectors(base)
    scores = {}
    for processes in (False, True):
        decode = base.decode.model_copy(update={"processes": processes, "workers": 1})
        with Pipeline(base.model_copy(update={"decode": decode}), detectors) as pipe:
            if processes:
                assert pipe._parent_keys == []  # every input is prepared in the child
            verdicts = list(pipe.moderate(file_source(p) for p in images))
        assert all(v.status == "ok" for v in verdicts)
        scores[processes] = {v.source.path: {k: d.scores for k, d in v.detectors.items()} for v in verdicts}
    for path, by_detector in scores[True].items():
        assert set(by_detector) == {"clip_zeroshot", "falconsai_vit"}
        for detector, values in by_detector.items():
            assert values == pytest.approx(scores[False][path][detector], abs=1e-6), (path, detector)
