"""S3 actions (tag, quarantine) against a real S3 API server, run twice as a redelivered
message would run them."""

import pytest

from worker.actions import ObjectActions
from worker.policy import PolicyActions, QuarantineAction
from worker.verdict import Source, Verdict


def verdict(bucket, key, etag, decision="unsafe", version_id=None):
    source = Source(
        kind="s3", uri=f"s3://{bucket}/{key}", bucket=bucket, key=key, etag=etag, version_id=version_id
    )
    return Verdict(id="v", source=source, status="ok", decision=decision, policy_version="p")


@pytest.fixture
def actions(s3_client):
    return ObjectActions(s3_client)


def etag_of(s3_client, bucket, key):
    return s3_client.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')


def test_tag_merges_with_existing_tags_and_is_idempotent(actions, s3_client, bucket):
    s3_client.put_object(Bucket=bucket, Key="a.jpg", Body=b"x", Tagging="owner=team-a")
    v = verdict(bucket, "a.jpg", etag_of(s3_client, bucket, "a.jpg"), decision="review")
    for _ in range(2):
        done = actions.apply(v, PolicyActions(tag=True))
        assert done == {"tagged": {"modgate-decision": "review"}}
    tags = {t["Key"]: t["Value"] for t in s3_client.get_object_tagging(Bucket=bucket, Key="a.jpg")["TagSet"]}
    assert tags == {"owner": "team-a", "modgate-decision": "review"}


def test_quarantine_moves_once_and_a_rerun_reports_it_done(actions, s3_client, bucket):
    s3_client.create_bucket(Bucket=f"{bucket}-q")
    s3_client.put_object(Bucket=bucket, Key="dir/bad.jpg", Body=b"unsafe bytes")
    v = verdict(bucket, "dir/bad.jpg", etag_of(s3_client, bucket, "dir/bad.jpg"))
    policy = PolicyActions(tag=True, quarantine=QuarantineAction(bucket=f"{bucket}-q", prefix="held/"))
    first = actions.apply(v, policy)
    second = actions.apply(v, policy)  # the redelivered message
    assert first["quarantined_to"] == second["quarantined_to"] == f"s3://{bucket}-q/held/dir/bad.jpg"
    assert "error" not in first and "error" not in second
    moved = s3_client.get_object(Bucket=f"{bucket}-q", Key="held/dir/bad.jpg")
    assert moved["Body"].read() == b"unsafe bytes"
    tags = s3_client.get_object_tagging(Bucket=f"{bucket}-q", Key="held/dir/bad.jpg")["TagSet"]
    assert {"Key": "modgate-decision", "Value": "unsafe"} in tags
    assert s3_client.list_objects_v2(Bucket=bucket).get("KeyCount") == 0


def test_safe_objects_stay_and_changed_objects_are_not_moved(actions, s3_client, bucket):
    s3_client.put_object(Bucket=bucket, Key="ok.jpg", Body=b"fine")
    policy = PolicyActions(quarantine=QuarantineAction())
    assert (
        actions.apply(verdict(bucket, "ok.jpg", etag_of(s3_client, bucket, "ok.jpg"), "safe"), policy) is None
    )
    judged = etag_of(s3_client, bucket, "ok.jpg")
    s3_client.put_object(Bucket=bucket, Key="ok.jpg", Body=b"replaced after judging")
    done = actions.apply(verdict(bucket, "ok.jpg", judged), policy)
    assert "error" in done and "quarantined_to" not in done
    assert s3_client.get_object(Bucket=bucket, Key="ok.jpg")["Body"].read() == b"replaced after judging"
