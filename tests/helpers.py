"""Helpers the worker tests share (integration and fault suites): sample objects in a
bucket, reading the results stream, and waiting for a condition."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from typing import Any

from modgate import keys
from worker.tools.samples import photo


def jpeg(seed: int, w: int = 320, h: int = 240) -> bytes:
    buf = io.BytesIO()
    photo(w, h, seed).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def verdicts(r: Any) -> list[dict]:
    return [json.loads(fields[b"verdict"]) for _, fields in r.xrange(keys.VERDICT_STREAM)]


def wait_for(check: Callable[[], Any], timeout: float = 90.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def upload(s3_client: Any, bucket: str, n: int, prefix: str = "img") -> list[str]:
    for i in range(n):
        s3_client.put_object(Bucket=bucket, Key=f"{prefix}/{i:03d}.jpg", Body=jpeg(i))
    return [f"{prefix}/{i:03d}.jpg" for i in range(n)]
