"""JSON logs carry verdict fields and never credentials."""

import json
import logging

from worker.logs import JsonFormatter, TextFormatter, scrub


def test_scrub_removes_url_credentials():
    assert scrub("redis://:hunter2@redis:6379/0") == "redis://***@redis:6379/0"
    assert scrub("https://user:tok@h.example/x and more") == "https://***@h.example/x and more"
    assert scrub("http://h.example/x") == "http://h.example/x"


def test_json_line_with_extra_fields():
    record = logging.LogRecord("worker.service", logging.INFO, __file__, 1, "verdict %s", ("abc",), None)
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
    record = logging.LogRecord("worker.service", logging.WARNING, __file__, 1, "verdict %s", ("abc",), None)
    record.verdict_id = "abc"
    record.uri = "s3://uploads/a b.jpg"
    record.code = "not_found"
    record.request_id = None
    record.url = "https://tok@h.example/hook"
    line = TextFormatter().format(record)
    assert "WARNING worker.service: verdict abc" in line
    assert 'uri="s3://uploads/a b.jpg"' in line and "code=not_found" in line and "verdict_id=abc" in line
    assert "request_id" not in line and "tok" not in line
