"""JSON logs carry verdict fields and never credentials."""

import json
import logging

from worker.observe.logs import JsonFormatter, TextFormatter, scrub


def test_scrub_removes_url_credentials():
    assert scrub("redis://:hunter2@redis:6379/0") == "redis://***@redis:6379/0"
    assert scrub("https://user:tok@h.example/x and more") == "https://***@h.example/x and more"
    assert scrub("http://h.example/x") == "http://h.example/x"


def test_json_line_with_extra_fields():
    record = logging.LogRecord(
        "worker.service.service", logging.INFO, __file__, 1, "verdict %s", ("abc",), None
    )
    record.verdict_id = "abc"
    record.decision = "unsafe"
    record.url = "redis://:pw@h:1/0"
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "verdict abc" and line["verdict_id"] == "abc" and line["decision"] == "unsafe"
    assert line["level"] == "info" and "pw" not in line["url"]


def test_scrub_removes_a_bare_token_before_the_host():
    assert scrub("cloning https://ghp_abc123@github.com/x.git") == "cloning https://***@github.com/x.git"
    assert scrub("redis://s3cr3t@redis:6379/0") == "redis://***@redis:6379/0"
    assert scrub("s3://bucket/people/me@example.com.jpg") == "s3://bucket/people/me@example.com.jpg"


def test_text_lines_carry_the_fields_of_an_error_verdict():
    record = logging.LogRecord(
        "worker.service.service", logging.WARNING, __file__, 1, "verdict %s", ("abc",), None
    )
    record.verdict_id = "abc"
    record.uri = "s3://uploads/a b.jpg"
    record.code = "not_found"
    record.request_id = None
    record.url = "https://tok@h.example/hook"
    line = TextFormatter().format(record)
    assert "WARNING worker.service.service: verdict abc" in line
    assert 'uri="s3://uploads/a b.jpg"' in line and "code=not_found" in line and "verdict_id=abc" in line
    assert "request_id" not in line and "tok" not in line


NASTY_KEY = "dir/a\x01b\tc\x7f.jpg\n2026-01-01 00:00:00,000 ERROR forged: \x1b[2J\x00\x85\x9b\u2028end"


def record_with_key(exc_info=None):
    record = logging.LogRecord(
        "worker.service.service",
        logging.WARNING,
        __file__,
        1,
        "verdict for %s",
        (f"s3://b/{NASTY_KEY}",),
        exc_info,
    )
    record.uri = f"s3://b/{NASTY_KEY}"
    record.key = NASTY_KEY
    return record


def raw_controls(text):
    return [c for c in text if ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or c in "\u2028\u2029"]


def test_json_lines_escape_every_control_character_and_keep_the_key_exact():
    line = JsonFormatter().format(record_with_key())
    assert raw_controls(line) == []
    parsed = json.loads(line)
    assert parsed["key"] == NASTY_KEY and parsed["msg"] == f"verdict for s3://b/{NASTY_KEY}"


def test_text_lines_escape_control_characters_in_messages_fields_and_tracebacks():
    line = TextFormatter().format(record_with_key())
    assert raw_controls(line) == []
    assert (
        "a\\u0001b\\tc\\u007f.jpg\\n2026-01-01" in line
        and "\\u001b[2J\\u0000\\u0085\\u009b\\u2028end" in line
    )
    # A field value is quoted, so it reads back exactly.
    assert json.loads(line.split(" key=", 1)[1]) == NASTY_KEY
    try:
        raise ValueError(f"cannot fetch {NASTY_KEY}")
    except ValueError:
        import sys

        failed = TextFormatter().format(record_with_key(sys.exc_info()))
    _, *rest = failed.split("\n")
    # Only a record's first line is flush left: the exception's newline cannot forge one.
    assert rest and all(part.startswith("    ") for part in rest)
    assert "\n    2026-01-01 00:00:00,000 ERROR forged: \\u001b[2J" in failed
    assert raw_controls(failed.replace("\n", "")) == []
