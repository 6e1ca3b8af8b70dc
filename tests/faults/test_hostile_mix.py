"""Hostile uploads interleaved with ordinary ones in the queue: decode-bomb GIFs (120
frames compositing over each other on a 4000×4000 canvas, ~1.5 MB), 16-bit giant PNGs,
truncated files, a progressive-JPEG scan bomb (one AC scan repeated) and a GIF whose
frames hide behind a junk byte, among 200 normal JPEGs. Every normal image must get an ok
verdict within the message timeout (the suite's 30 s, so the check can fail), every
hostile one a verdict with a coded error, or, for the junk-byte GIF, one judged on all its
frames (not on frame 0, the only plain one). Twice: one worker process, and the split shape of a GPU node (an
ingest process feeding a ``modgate serve-inference`` process whose tensor decode path
takes the JPEGs)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from modgate import keys
from modgate.contract import Item
from modgate.settings import ProducerRoute, load_settings
from producers.enqueuer import Enqueuer
from tests.faults.conftest import MESSAGE_TIMEOUT_S
from tests.faults.hostile import (
    bomb_gif,
    giant_png16,
    junk_byte_gif,
    progressive_jpeg,
    scan_bomb_jpeg,
    truncated,
)
from tests.helpers import jpeg, wait_for
from tests.servers import InferenceProcess

N_NORMAL = 200
PER_MESSAGE = 4
# key -> the frames in the file, and how many are scored (decode.max_frames).
JUDGED_ON = {"hostile/junk-byte.gif": (41, 8)}


def huge_header_jpeg() -> bytes:
    """A small JPEG whose frame header claims 65,000 × 65,000 pixels."""
    data = bytearray(jpeg(3))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (65000).to_bytes(2, "big") * 2
    return bytes(data)


@pytest.fixture(params=["single", "split"])
def shape_env(request, env, tmp_path):
    """The worker's env for one process, or for an ingest process with its inference process."""
    if request.param == "single":
        yield env
        return
    sock_dir = Path(tempfile.mkdtemp(prefix="mg-"))
    inference = InferenceProcess(
        {**env, "MODGATE_DECODE__BACKEND": "tensor"}, sock_dir / "inference.sock", tmp_path / "inference.log"
    )
    yield {**env, "MODGATE_INFERENCE__SOCKET": str(inference.socket)}
    inference.stop()
    shutil.rmtree(sock_dir, ignore_errors=True)


def _hostile() -> dict[str, tuple[bytes, set[str]]]:
    """key -> (bytes, the outcomes allowed: an error code, or "ok" for valid giants)."""
    bomb = bomb_gif(keyframes=False)
    png16 = giant_png16(8000, 8000)  # 64 MP grey 16-bit (I;16): ~1 GB peak decoded naively
    return {
        **{f"hostile/bomb-{i}.gif": (bomb, {"image_too_complex"}) for i in range(4)},
        # The same size with full-canvas frames is cheap to sample (8 frames decoded, not
        # 120): within budget, judged, but never a stall.
        "hostile/big-animation.gif": (bomb_gif(), {"ok", "image_too_complex"}),
        "hostile/bomb-truncated.gif": (truncated(bomb), {"image_too_complex", "corrupt_image"}),
        "hostile/giant-grey16.png": (png16, {"ok", "image_too_complex"}),
        "hostile/giant-rgb48.png": (giant_png16(4000, 4000, color=True), {"ok", "image_too_complex"}),
        "hostile/truncated-grey16.png": (truncated(giant_png16(2000, 2000)), {"corrupt_image"}),
        "hostile/truncated.jpg": (truncated(jpeg(7, 640, 480)), {"corrupt_image"}),
        "hostile/huge-header.jpg": (huge_header_jpeg(), {"image_too_large"}),
        # 1,010 scans of 2000² (~35 KB): refused by its scan count before any decoder runs.
        "hostile/scan-bomb.jpg": (scan_bomb_jpeg(2000, 1000), {"image_too_complex"}),
        # Within the scan budget: decoded in a decode process (killable mid-decode), judged.
        "hostile/progressive.jpg": (progressive_jpeg(640, seed=7), {"ok"}),
        # Frame 0 is plain white, frames 1..40 photos behind a 0x00 byte: judged on all.
        "hostile/junk-byte.gif": (junk_byte_gif(41, 64), {"ok"}),
    }


def test_hostile_uploads_do_not_stall_or_fail_open_the_normal_ones(shape_env, r, workers, s3_client, bucket):
    env = shape_env
    hostile = _hostile()
    for key, (data, _) in hostile.items():
        s3_client.put_object(Bucket=bucket, Key=key, Body=data)
    normal = [f"normal/{i:03d}.jpg" for i in range(N_NORMAL)]
    for i, key in enumerate(normal):
        s3_client.put_object(Bucket=bucket, Key=key, Body=jpeg(i))
    # A hostile key every ~22 normal ones, so they share messages and decode threads.
    order = list(normal)
    for n, key in enumerate(hostile):
        order.insert((n + 1) * len(order) // (len(hostile) + 1), key)

    worker = workers(env, queues="modgate")
    enqueuer = Enqueuer(load_settings(redis={"url": env["MODGATE_REDIS__URL"]}))
    sent_ms: dict[str, int] = {}
    for i in range(0, len(order), PER_MESSAGE):
        chunk = order[i : i + PER_MESSAGE]
        seconds, micros = r.time()  # Redis' clock, the one stream entry ids use
        sent_ms.update({k: seconds * 1000 + micros // 1000 for k in chunk})
        enqueuer.send([Item(bucket=bucket, key=k) for k in chunk], ProducerRoute(bucket=bucket))

    def entries() -> dict[str, list[tuple[int, dict]]]:
        out: dict[str, list[tuple[int, dict]]] = {}
        for entry_id, fields in r.xrange(keys.VERDICT_STREAM):
            verdict = json.loads(fields[b"verdict"])
            out.setdefault(verdict["source"]["key"], []).append((int(entry_id.split(b"-")[0]), verdict))
        return out

    try:
        wait_for(
            lambda: set(entries()) >= set(order) and r.zcard(keys.OUTBOX) == 0,
            timeout=240,
            what="a verdict for every key",
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {len(entries())}/{len(order)}\n{worker.tail(3000)}") from None

    got = entries()
    assert {k: len(v) for k, v in got.items() if len(v) != 1} == {}, "keys with more than one verdict"
    late_or_failed = {}
    for key in normal:
        at_ms, verdict = got[key][0]
        if verdict["status"] != "ok" or at_ms - sent_ms[key] > MESSAGE_TIMEOUT_S * 1000:
            code = (verdict.get("error") or {}).get("code")
            late_or_failed[key] = f"{verdict['status']}/{code} after {(at_ms - sent_ms[key]) / 1000:.1f}s"
    outcomes = {}
    for key, (_, allowed) in hostile.items():
        at_ms, verdict = got[key][0]
        outcome = "ok" if verdict["status"] == "ok" else verdict["error"]["code"]
        if outcome not in allowed:
            outcomes[key] = f"{outcome} after {(at_ms - sent_ms[key]) / 1000:.1f}s (want {sorted(allowed)})"
        elif key in JUDGED_ON:
            judged = ((verdict.get("image") or {}).get("frame_count"), verdict.get("frames"))
            if judged != JUDGED_ON[key]:
                outcomes[key] = f"judged on (frames in file, scored) {judged}, want {JUDGED_ON[key]}"
    slowest = max(got[k][0][0] - sent_ms[k] for k in normal) / 1000
    print(f"\nhostile mix: slowest normal image {slowest:.1f}s after it was sent")
    assert (late_or_failed, outcomes) == ({}, {}), (
        f"{len(late_or_failed)}/{N_NORMAL} normal images not ok within {MESSAGE_TIMEOUT_S}s "
        f"(e.g. {dict(list(late_or_failed.items())[:3])}); hostile inputs with the wrong outcome: {outcomes}"
    )
