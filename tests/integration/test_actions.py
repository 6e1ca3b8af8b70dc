"""S3 actions (tag, quarantine) against a real S3 API server, run twice as a redelivered
message would run them."""

import pytest

from worker.actions import ObjectActions, TransientActionError, outcome, plan, record_outcome
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


def test_plan_says_what_the_policy_calls_for(bucket):
    policy = PolicyActions(tag=True, quarantine=QuarantineAction(bucket=f"{bucket}-q", prefix="held/"))
    assert plan(verdict(bucket, "d/x.jpg", "e"), policy) == {
        "tag": {"modgate-decision": "unsafe"},
        "quarantine_to": f"s3://{bucket}-q/held/d/x.jpg",
    }
    assert plan(verdict(bucket, "d/x.jpg", "e", decision="safe"), policy) == {
        "tag": {"modgate-decision": "safe"}
    }
    assert plan(verdict(bucket, "d/x.jpg", "e"), PolicyActions()) is None


def test_s3_errors_that_may_pass_raise_and_others_are_the_outcome(moto_server, s3_client, bucket):
    import boto3
    from botocore.config import Config

    from tests.faults.proxy import S3_SLOW_DOWN, Fault, FaultProxy

    s3_client.put_object(Bucket=bucket, Key="a.jpg", Body=b"x")
    proxy = FaultProxy(moto_server.url)
    proxy.rule = lambda method, path: (
        Fault(status=503, body=S3_SLOW_DOWN) if method == "PUT" and "tagging" in path else None
    )
    client = boto3.client(
        "s3",
        endpoint_url=proxy.url,
        region_name="us-east-1",
        config=Config(retries={"mode": "standard", "total_max_attempts": 1}),
    )
    v = verdict(bucket, "a.jpg", etag_of(s3_client, bucket, "a.jpg"))
    with pytest.raises(TransientActionError, match="SlowDown"):
        ObjectActions(client).apply(v, PolicyActions(tag=True))
    proxy.stop()
    # The object changed since it was judged: trying again cannot help, so that is the outcome.
    s3_client.put_object(Bucket=bucket, Key="a.jpg", Body=b"changed")
    done = ObjectActions(s3_client).apply(v, PolicyActions(quarantine=QuarantineAction()))
    assert "changed since it was judged" in done["error"]


def test_outcomes_are_readable_by_verdict_id(redis_server):
    import redis

    r = redis.Redis.from_url(redis_server.url)
    assert outcome(r, "v-none") is None
    record_outcome(r, "v1", {"tagged": {"modgate-decision": "unsafe"}}, ttl_s=60)
    assert outcome(r, "v1") == {"tagged": {"modgate-decision": "unsafe"}}
    assert 0 < r.ttl("modgate:actions:v1") <= 60
