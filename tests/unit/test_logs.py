"""JSON logs carry verdict fields and never credentials."""

import json
import logging

from worker.logs import JsonFormatter, scrub


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
