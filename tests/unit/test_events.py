"""S3 event notification shapes → object events."""

import json
from pathlib import Path
from urllib.parse import quote_plus

import pytest

from producers.events import MalformedEvent, ObjectEvent, parse

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "events"

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
    "body", ["not json", "[1, 2]", json.dumps({"hello": 1}), "[" * 20_000 + "]" * 20_000]
)
def test_malformed_bodies_raise(body):
    with pytest.raises(MalformedEvent):
        parse(body)


def test_deeply_nested_object_is_malformed_not_a_crash():
    deep = '{"Records": [' + '{"a":' * 20_000 + "1" + "}" * 20_000 + "]}"
    with pytest.raises(MalformedEvent, match="nested too deeply"):
        parse(deep)


def load_fixture(path: Path) -> tuple[dict, dict]:
    """A documented sample without its ``_comment``/``_expect`` annotations, and the expectation."""
    data = json.loads(path.read_text())
    expect = data.pop("_expect")
    data.pop("_comment")
    return data, expect


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.json")), ids=lambda p: p.stem)
def test_documented_samples_of_each_store(path):
    body, expect = load_fixture(path)
    parsed = parse(json.dumps(body))
    assert [e.key for e in parsed.events] == expect["keys"]
    assert len(parsed.ignored) == expect["ignored"] and not getattr(parsed, "invalid", [])


@pytest.mark.parametrize("action", ["PutTagging", "DeleteTagging", "PutRetention", "PutLegalHold"])
def test_minio_metadata_changes_are_not_uploads(action):
    parsed = parse({"Records": [record("a.jpg", name=f"s3:ObjectCreated:{action}"), record("b.jpg")]})
    assert [e.key for e in parsed.events] == ["b.jpg"]
    assert parsed.ignored == [f"s3:ObjectCreated:{action} (a metadata change, not an upload)"]


def test_keys_are_decoded_per_event_source():
    raw = "dir/a+b 100%25.jpg"  # as Ceph stores and sends it
    body = {"Records": [{**record("x"), "eventSource": "ceph:s3"}]}
    body["Records"][0]["s3"]["object"]["key"] = raw
    assert [e.key for e in parse(body).events] == [raw]
    # Sources not named raw are decoded the AWS/MinIO way; the list is a setting.
    assert [e.key for e in parse(body, raw_key_sources=()).events] == ["dir/a b 100%.jpg"]
    minio = {"Records": [{**record("dir/a+b 100%.jpg"), "eventSource": "minio:s3"}]}
    assert [e.key for e in parse(minio).events] == ["dir/a+b 100%.jpg"]


BAD_OBJECTS = {
    "bucket under 3 characters": ({"bucket": {"name": "ab"}}, {}),
    "empty key": ({}, {"key": ""}),
    "key over 1024 characters": ({}, {"key": "k" * 1025}),
    "negative size": ({}, {"size": -1}),
    "key not a string": ({}, {"key": 5}),
    "eTag not a string": ({}, {"eTag": ["a"]}),
    "size not a number": ({}, {"size": "12kB"}),
    "size a float": ({}, {"size": 1.5}),
    "size a boolean": ({}, {"size": True}),
    "bucket name missing": ({"bucket": {}}, {}),
    "bucket not an object": ({"bucket": "b"}, {}),
    "control character in bucket": ({"bucket": {"name": "bk\x01t"}}, {}),
    "control characters alone, but empty once decoded": ({}, {"key": ""}),
    "key not UTF-8 once decoded": ({}, {"key": "a%FFb.jpg"}),
}


@pytest.mark.parametrize("case", BAD_OBJECTS, ids=list(BAD_OBJECTS))
def test_one_invalid_record_does_not_poison_its_batch(case):
    s3_patch, obj_patch = BAD_OBJECTS[case]
    bad = record("bad.jpg")
    bad["s3"].update(s3_patch)
    bad["s3"]["object"].update(obj_patch)
    parsed = parse(json.dumps({"Records": [record("good 1.jpg"), bad, record("good 2.jpg")]}))
    assert [e.key for e in parsed.events] == ["good 1.jpg", "good 2.jpg"]
    assert [r.record for r in parsed.invalid] == ["Records[1]"] and parsed.invalid[0].reason


def test_size_beyond_any_float_is_invalid_not_a_crash():
    text = json.dumps({"Records": [record("a.jpg")]}).replace('"size": 5', '"size": 1e400')
    parsed = parse(text)
    assert parsed.events == [] and "whole number" in parsed.invalid[0].reason


def test_ceph_sizes_are_strings_of_digits():
    (event,) = parse({"Records": [record("a.jpg", size="1024")]}).events
    assert event.size == 1024


@pytest.mark.parametrize(
    "shape",
    [
        {"Records": ["not a record"]},
        {"Records": [{"eventName": "ObjectCreated:Put"}]},
        {"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "bkt"}, "object": "x"}}]},
        {"Records": [{"eventName": 7, "s3": {}}]},
        {"Records": [{"EventSource": "aws:sns", "Sns": "not an object"}]},
        {"Records": [{"EventSource": "aws:sns", "Sns": {"Message": 5}}]},
        {"Records": [{"eventSource": "aws:sqs", "body": {"Records": []}}]},
        {"Records": [{"eventSource": "aws:sqs", "body": "not json"}]},
    ],
)
def test_wrong_shapes_inside_records_are_invalid_records(shape):
    shape["Records"].append(record("kept.jpg"))
    parsed = parse(json.dumps(shape))
    assert [e.key for e in parsed.events] == ["kept.jpg"] and len(parsed.invalid) == 1


def test_wrapped_records_are_named_where_they_are():
    inner = json.dumps({"Records": [record("ok.jpg"), record("bad", bucket="x")]})
    parsed = parse({"Records": [{"eventSource": "aws:sqs", "messageId": "1", "body": inner}]})
    assert [e.key for e in parsed.events] == ["ok.jpg"]
    assert [r.record for r in parsed.invalid] == ["Records[0].body.Records[1]"]


def test_eventbridge_wrong_types_are_invalid():
    event = {
        "detail-type": "Object Created",
        "source": "aws.s3",
        "detail": {"bucket": {"name": "bkt"}, "object": {"key": ["x"], "size": 7}},
    }
    parsed = parse(event)
    assert parsed.events == [] and parsed.invalid[0].record == "detail"


# S3 stores keys with any of U+0000-001F and U+007F-009F; each must arrive exactly.
CONTROL_KEYS = [
    "dir/a\x01b\tc\x7f.jpg",
    "dir/line\nbreak\r.jpg",
    "nul\x00.jpg",
    "esc\x1b[31mred.jpg",
    "c1\x85\x9b.jpg",
    "".join(map(chr, [*range(0x20), *range(0x7F, 0xA0)])) + ".jpg",
]


def test_keys_with_control_characters_arrive_exactly_in_every_shape():
    aws = parse(json.dumps({"Records": [record(k) for k in CONTROL_KEYS]}))
    assert [e.key for e in aws.events] == CONTROL_KEYS and not aws.invalid
    raw = {"Records": [{**record("x"), "eventSource": "ceph:s3"} for _ in CONTROL_KEYS]}
    for rec, key in zip(raw["Records"], CONTROL_KEYS, strict=True):
        rec["s3"]["object"]["key"] = key  # Ceph RGW sends keys as stored
    assert [e.key for e in parse(json.dumps(raw)).events] == CONTROL_KEYS
    bridge = [
        {
            "detail-type": "Object Created",
            "source": "aws.s3",
            "detail": {"bucket": {"name": "bkt"}, "object": {"key": k, "size": 7}},
        }
        for k in CONTROL_KEYS
    ]
    assert [parse(json.dumps(b)).events[0].key for b in bridge] == CONTROL_KEYS
    assert [ObjectEvent("bkt", k).to_item().key for k in CONTROL_KEYS] == CONTROL_KEYS


def test_object_event_to_item_refuses_what_the_queue_refuses():
    with pytest.raises(ValueError, match="control character U\\+0001"):
        ObjectEvent("bk\x01t", "a").to_item()
    with pytest.raises(ValueError, match="key"):
        ObjectEvent("bkt", "").to_item()
    with pytest.raises(ValueError, match="bucket"):
        ObjectEvent("b", "a").to_item()
    assert ObjectEvent("bkt", "a b", size=3).to_item().size == 3
