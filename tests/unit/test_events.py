"""S3 event notification shapes → object events."""

import json
from urllib.parse import quote_plus

import pytest

from producers.events import MalformedEvent, parse

KEYS = ["dir/a b.jpg", "dir/c+d.jpg", "dir/100%.jpg", "dir/ünï cødé 🐱.jpg", "a/b/c/d/e.png", "q?x=1&y#.jpg"]


def record(key, name="ObjectCreated:Put", bucket="bkt", **obj):
    return {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "eventName": name,
        "s3": {
            "bucket": {"name": bucket},
            "object": {"key": quote_plus(key), "size": 5, "eTag": "abc", **obj},
        },
    }


def test_records_keys_are_url_decoded_exactly():
    parsed = parse(json.dumps({"Records": [record(k) for k in KEYS]}))
    assert [e.key for e in parsed.events] == KEYS
    assert all(e.bucket == "bkt" and e.etag == "abc" and e.size == 5 for e in parsed.events)


def test_minio_event_names_and_version_ids():
    body = {"Records": [record("x y.jpg", name="s3:ObjectCreated:Put", versionId="v1")]}
    (event,) = parse(body).events
    assert (event.key, event.version_id) == ("x y.jpg", "v1")


def test_non_create_events_and_test_event_are_ignored():
    parsed = parse({"Records": [record("a.jpg", name="ObjectRemoved:Delete"), record("b.jpg")]})
    assert [e.key for e in parsed.events] == ["b.jpg"] and parsed.ignored == ["ObjectRemoved:Delete"]
    test_event = {"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "bkt"}
    assert parse(json.dumps(test_event)).events == []


def test_sns_envelope():
    inner = json.dumps({"Records": [record("s n s.jpg")]})
    parsed = parse({"Type": "Notification", "MessageId": "m", "TopicArn": "arn:t", "Message": inner})
    assert [e.key for e in parsed.events] == ["s n s.jpg"]
    assert parse({"Type": "SubscriptionConfirmation", "Message": "x"}).ignored == [
        "SNS SubscriptionConfirmation"
    ]


def test_eventbridge_object_created_keeps_keys_as_they_are():
    event = {
        "version": "0",
        "detail-type": "Object Created",
        "source": "aws.s3",
        "detail": {
            "bucket": {"name": "bkt"},
            "object": {"key": "e b+%.jpg", "size": 7, "etag": "x", "version-id": "v"},
            "reason": "PutObject",
        },
    }
    (e,) = parse(event).events
    assert (e.key, e.size, e.etag, e.version_id) == ("e b+%.jpg", 7, "x", "v")
    deleted = {**event, "detail-type": "Object Deleted"}
    assert parse(deleted).events == [] and parse(deleted).ignored


def test_lambda_sqs_and_sns_wrappers():
    s3_body = json.dumps({"Records": [record("l a.jpg")]})
    sqs = {"Records": [{"eventSource": "aws:sqs", "messageId": "1", "body": s3_body}]}
    sns = {"Records": [{"EventSource": "aws:sns", "Sns": {"Message": s3_body}}]}
    assert [e.key for e in parse(sqs).events] == ["l a.jpg"]
    assert [e.key for e in parse(sns).events] == ["l a.jpg"]


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        "[1, 2]",
        json.dumps({"hello": 1}),
        json.dumps({"Records": [{"eventName": "ObjectCreated:Put"}]}),
    ],
)
def test_malformed_bodies_raise(body):
    with pytest.raises(MalformedEvent):
        parse(body)
