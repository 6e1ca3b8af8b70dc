"""Logging setup: one JSON object per line (or plain text), with credentials scrubbed.

Fields passed through ``extra=`` (``verdict_id``, ``decision``, ``code``, ``request_id``...)
become top-level JSON keys, so log pipelines can join logs to verdicts.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime

# Userinfo in URLs: user:password@ (redis://:secret@host, https://user:token@host) and a
# bare token@ (https://ghp_token@host, redis://secret@host).
_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def scrub(text: str) -> str:
    if "@" not in text:  # the common case, on the per-verdict log path
        return text
    return _CREDENTIALS.sub("***@", text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": scrub(record.getMessage()),
        }
        for key, value in _fields(record).items():
            out[key] = value if isinstance(value, (int, float, bool, type(None))) else scrub(str(value))
        if record.exc_info:
            out["exc"] = scrub(self.formatException(record.exc_info))
        return json.dumps(out, ensure_ascii=False)


def _fields(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}


class TextFormatter(logging.Formatter):
    """``<time> <level> <logger>: <message> key=value ...``: the same fields as the JSON
    lines (``uri``, ``code``, ``verdict_id``...), scrubbed."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        pairs = [f"{k}={_value(v)}" for k, v in _fields(record).items() if v is not None]
        return " ".join([line, *pairs])

    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record))


def _value(v: object) -> str:
    text = str(v)
    return json.dumps(text, ensure_ascii=False) if not text or any(c in text for c in ' ="') else text


def setup_logging(fmt: str = "json", level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Celery logs every task's arguments at INFO, twice (received, succeeded): whole
    # payloads, per message. Our own per-message line replaces them.
    for name in ("celery.app.trace", "celery.worker.strategy"):
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
