"""The progressive-JPEG scan bomb of issue 16, side by side in one run: what one upload
costs a worker without the scan budget (decoded on a decode thread, as before), with it
(refused from the probe), and with the budget lifted in a decode process (the wall-clock
limit stops the decoder mid-call).

The bomb: an 8000² progressive JPEG whose luma AC scan is repeated 6,000 times (~0.9 MB);
libjpeg decodes every scan over the whole image. CPU seconds of this process are the fair
figure on a shared machine (the decode-process case reports wall seconds: its CPU is the
child's).

    python bench/bench_scan_bomb.py [--side 8000] [--repeats 6000] [--out bench/results/scan_bomb.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modgate.errors import ModerationError
from modgate.settings import DecodeSettings
from tests.faults.hostile import scan_bomb_jpeg
from worker.ingest.decode import decode_image
from worker.ingest.decode_pool import DecodeProcesses
from worker.ingest.probe import probe

UNBOUNDED_SCANS = 1_000_000


def outcome(run) -> dict:
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        run()
        result = "decoded"
    except ModerationError as exc:
        result = exc.code.value
    return {
        "result": result,
        "wall_s": round(time.perf_counter() - wall, 3),
        "cpu_s": round(time.process_time() - cpu, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=8000)
    parser.add_argument("--repeats", type=int, default=6000)
    parser.add_argument("--out", type=Path, default=Path("bench/results/scan_bomb.json"))
    args = parser.parse_args()
    data = scan_bomb_jpeg(args.side, args.repeats)
    info = probe(data)
    budgeted = DecodeSettings()
    unbounded = DecodeSettings(max_jpeg_scans=UNBOUNDED_SCANS)
    # min_side 224: the draft decode the default detectors get (draft does not skip scans)
    thread_before = outcome(lambda: decode_image(data, unbounded, 224))
    thread_after = outcome(lambda: decode_image(data, budgeted, 224))
    procs = DecodeProcesses(1, unbounded, 0, {}, False)
    try:
        process_lifted = outcome(lambda: procs.run(data, probe(data)))
    finally:
        procs.close()
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "bomb": {"side": args.side, "scans": info.scans, "bytes": len(data)},
        "max_jpeg_scans": budgeted.max_jpeg_scans,
        "max_decode_s": budgeted.max_decode_s,
        "decode_thread_no_scan_budget": thread_before,
        "decode_thread_scan_budget": thread_after,
        "decode_process_no_scan_budget": process_lifted,
        "cpu_ratio_before_after": round(thread_before["cpu_s"] / max(thread_after["cpu_s"], 1e-3), 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
