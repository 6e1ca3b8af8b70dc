"""Logging setup: one JSON object per line (or plain text), with credentials scrubbed.

Fields passed through ``extra=`` (``verdict_id``, ``decision``, ``code``, ``request_id``...)
become top-level JSON keys, so log pipelines can join logs to verdicts.

S3 keys may hold any control character, and they reach messages and fields: no log line
carries one raw (a newline would forge a record, an ESC drive the terminal). JSON escapes
them all, C1 and DEL included; text escapes them the same way, and a traceback's lines
after the first are indented, so no record can start a line but at its timestamp.
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
# C0, DEL, C1, and the Unicode line and paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escaped(match: re.Match[str]) -> str:
    return json.dumps(match.group())[1:-1]  # \n, \t, \u001b, \u0085...


def escape(text: str) -> str:
    """``text`` with every control character as its JSON escape."""
    return _CONTROL.sub(_escaped, text)


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
        # json.dumps escapes only U+0000-001F: DEL, C1 and U+2028/9 as well.
        return escape(json.dumps(out, ensure_ascii=False))


def _fields(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}


class TextFormatter(logging.Formatter):
    """``<time> <level> <logger>: <message> key=value ...``: the same fields as the JSON
    lines (``uri``, ``code``, ``verdict_id``...), scrubbed, control characters escaped."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = escape(super().formatMessage(record))
        pairs = [f"{escape(k)}={_value(v)}" for k, v in _fields(record).items() if v is not None]
        return " ".join([line, *pairs])

    def format(self, record: logging.LogRecord) -> str:
        first, *rest = super().format(record).split("\n")
        # The newlines left are the traceback's own (the first line holds the message and
        # fields, escaped): its lines are escaped one by one and indented.
        return scrub("\n".join([first, *(f"    {escape(line)}" for line in rest)]))


def _value(v: object) -> str:
    text = str(v)
    if not text or any(c in text for c in ' ="\\') or _CONTROL.search(text):
        return escape(json.dumps(text, ensure_ascii=False))
    return text


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
