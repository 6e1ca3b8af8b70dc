"""S3 actions (tag, quarantine) against a real S3 API server, run twice as a redelivered
message would run them; error verdicts follow the policy's ``errors`` rules, through the
real service (real Redis, real pipeline and S3)."""

import pytest

from modgate.errors import ErrorCode
from modgate.policy import PolicyActions, QuarantineAction, ResolvedErrorRule
from modgate.verdict import Source, Verdict, error_verdict
from tests.helpers import jpeg, verdicts
from worker.delivery.actions import (
    ObjectActions,
    TransientActionError,
    outcome,
    outcome_id,
    plan,
    record_outcome,
)


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


# -- error verdicts -----------------------------------------------------------------------


def error_of(bucket, key, code=ErrorCode.CORRUPT_IMAGE):
    source = Source(kind="s3", uri=f"s3://{bucket}/{key}", bucket=bucket, key=key)
    return error_verdict(source, "p", code, "bad bytes")


def tags_of(s3_client, bucket, key):
    return {t["Key"]: t["Value"] for t in s3_client.get_object_tagging(Bucket=bucket, Key=key)["TagSet"]}


def test_an_error_verdict_tags_its_object_by_default_and_none_leaves_it(actions, s3_client, bucket):
    s3_client.put_object(Bucket=bucket, Key="bad.png", Body=b"not quite a png")
    v = error_of(bucket, "bad.png")
    assert plan(v, PolicyActions()) == {"tag": {"modgate-decision": "error"}}
    assert actions.apply(v, PolicyActions()) == {"tagged": {"modgate-decision": "error"}}
    assert tags_of(s3_client, bucket, "bad.png") == {"modgate-decision": "error"}
    s3_client.put_object(Bucket=bucket, Key="left.png", Body=b"x")
    left = error_of(bucket, "left.png")
    assert plan(left, PolicyActions(), ResolvedErrorRule("none", False)) is None
    assert actions.apply(left, PolicyActions(), ResolvedErrorRule("none", False)) is None
    assert tags_of(s3_client, bucket, "left.png") == {}


def test_quarantine_for_an_error_moves_it_to_the_configured_or_default_place(actions, s3_client, bucket):
    s3_client.put_object(Bucket=bucket, Key="d/huge.gif", Body=b"GIF89a too complex")
    s3_client.put_object(Bucket=bucket, Key="d/other.gif", Body=b"GIF89a too complex too")
    rule = ResolvedErrorRule("quarantine", False)
    held = PolicyActions(quarantine=QuarantineAction(prefix="held/"))
    done = actions.apply(error_of(bucket, "d/huge.gif", ErrorCode.IMAGE_TOO_COMPLEX), held, rule)
    assert done == {
        "tagged": {"modgate-decision": "error"},
        "quarantined_to": f"s3://{bucket}/held/d/huge.gif",
    }
    done = actions.apply(error_of(bucket, "d/other.gif", ErrorCode.IMAGE_TOO_COMPLEX), PolicyActions(), rule)
    assert done["quarantined_to"] == f"s3://{bucket}/quarantine/d/other.gif"
    keys = sorted(o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket)["Contents"])
    assert keys == ["held/d/huge.gif", "quarantine/d/other.gif"]
    assert tags_of(s3_client, bucket, "held/d/huge.gif") == {"modgate-decision": "error"}


def test_an_object_already_in_quarantine_is_tagged_not_moved_again(actions, s3_client, bucket):
    """A quarantined copy that is judged again (the bucket's notifications cover the prefix)
    fails the same way; it must stay put, not walk on to quarantine/quarantine/… forever."""
    s3_client.put_object(Bucket=bucket, Key="quarantine/d/huge.gif", Body=b"GIF89a too complex")
    rule = ResolvedErrorRule("quarantine", False)
    v = error_of(bucket, "quarantine/d/huge.gif", ErrorCode.IMAGE_TOO_COMPLEX)
    assert plan(v, PolicyActions(), rule) == {"tag": {"modgate-decision": "error"}}
    assert actions.apply(v, PolicyActions(), rule) == {"tagged": {"modgate-decision": "error"}}
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == ["quarantine/d/huge.gif"]


def test_dot_segment_keys_are_acted_on_literally_and_quarantined_inside_the_prefix(
    actions, s3_client, bucket
):
    s3_client.put_object(Bucket=bucket, Key="img/x.jpg", Body=b"someone else's")
    s3_client.put_object(Bucket=bucket, Key="a/../img/x.jpg", Body=b"evasive")
    v = error_of(bucket, "a/../img/x.jpg", ErrorCode.INVALID_KEY)
    assert actions.apply(v, PolicyActions()) == {"tagged": {"modgate-decision": "error"}}
    assert tags_of(s3_client, bucket, "a/../img/x.jpg") == {"modgate-decision": "error"}
    assert tags_of(s3_client, bucket, "img/x.jpg") == {}  # the object it would normalise to
    done = actions.apply(v, PolicyActions(), ResolvedErrorRule("quarantine", False))
    assert done["quarantined_to"] == f"s3://{bucket}/quarantine/a/%2E%2E/img/x.jpg"
    keys = sorted(o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket)["Contents"])
    assert keys == ["img/x.jpg", "quarantine/a/%2E%2E/img/x.jpg"]


def test_errors_with_no_object_of_ours_are_skipped_without_calling_s3(s3_client, bucket):
    class NoCalls:
        def __getattr__(self, name):
            raise AssertionError(f"S3 called: {name}")

    for code in (ErrorCode.NOT_FOUND, ErrorCode.BUCKET_NOT_ALLOWED):
        v = error_of(bucket, "gone.jpg", code)
        done = ObjectActions(NoCalls()).apply(v, PolicyActions(), ResolvedErrorRule("quarantine", False))
        assert done == {"skipped": plan(v, PolicyActions())["skip"]} and code.value in done["skipped"]
    # An object deleted between the verdict and the action: the outcome says so, once.
    done = ObjectActions(s3_client).apply(error_of(bucket, "gone.jpg"), PolicyActions())
    assert "NoSuchKey" in done["error"] and "tagged" not in done


def test_an_error_outcome_is_kept_apart_from_a_later_ok_verdict_of_the_same_object(bucket):
    err = error_of(bucket, "a.jpg", ErrorCode.TIMEOUT)
    ok = err.model_copy(update={"status": "ok", "error": None, "decision": "unsafe"})
    assert err.id == ok.id and outcome_id(err) != outcome_id(ok) == ok.id


@pytest.fixture
def service(redis_server, s3_env, moto_server):
    """The real service over real Redis and S3, with a real pipeline (Open-NSFW)."""
    import redis

    from modgate.settings import load_settings
    from worker.detectors import LoadedDetectors
    from worker.detectors.open_nsfw import OpenNSFW
    from worker.pipeline import Pipeline
    from worker.service.service import Service

    def make(policy):
        r = redis.Redis.from_url(redis_server.url)
        r.flushall()
        settings = load_settings(
            redis={"url": redis_server.url},
            s3={"endpoint_url": moto_server.url},
            worker={"metrics_port": 0},
            detectors={"enabled": ["open_nsfw"]},
            policy=policy,
        )
        svc = Service(settings, ["modgate"], schedule=lambda d, c: None, redis=r)
        svc.pipeline = Pipeline(settings, LoadedDetectors([OpenNSFW.load(settings)], {}))
        made.append(svc)
        return svc

    made = []
    yield make
    for svc in made:
        svc.pipeline.close()


def test_the_service_acts_on_error_verdicts_by_the_policy_errors_rules(service, s3_client, bucket):
    good = jpeg(1)
    objects = {
        "ok.jpg": good,
        "truncated.jpg": good[: len(good) // 2],  # corrupt_image: quarantined
        "notes.jpg": b"not an image at all",  # unsupported_format: the default, tagged
        "empty.jpg": b"",  # empty_object: action none, counts as review
        "a/../dotted.jpg": good,  # invalid_key: tagged where it is
    }
    for key, body in objects.items():
        s3_client.put_object(Bucket=bucket, Key=key, Body=body)
    svc = service(
        {
            "errors": {
                "corrupt_image": {"action": "quarantine"},
                "empty_object": {"action": "none", "review": True},
            }
        }
    )
    items = [*objects, "missing.jpg"]
    svc.moderate("t1", ({"items": [{"bucket": bucket, "key": k} for k in items]},), {})
    by_key = {v["source"]["key"]: v for v in verdicts(svc.redis)}
    codes = {k: (v["error"] or {}).get("code") for k, v in by_key.items()}
    assert codes == {
        "ok.jpg": None,
        "truncated.jpg": "corrupt_image",
        "notes.jpg": "unsupported_format",
        "empty.jpg": "empty_object",
        "a/../dotted.jpg": "invalid_key",
        "missing.jpg": "not_found",
    }
    assert by_key["ok.jpg"]["policy_actions"] is None  # ok verdicts: actions as before (none)
    assert by_key["empty.jpg"]["decision"] == "review" and by_key["empty.jpg"]["policy_actions"] is None
    assert by_key["notes.jpg"]["decision"] is None
    listed = sorted(o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket)["Contents"])
    assert listed == ["a/../dotted.jpg", "empty.jpg", "notes.jpg", "ok.jpg", "quarantine/truncated.jpg"]
    assert tags_of(s3_client, bucket, "quarantine/truncated.jpg") == {"modgate-decision": "error"}
    assert tags_of(s3_client, bucket, "notes.jpg") == {"modgate-decision": "error"}
    assert tags_of(s3_client, bucket, "a/../dotted.jpg") == {"modgate-decision": "error"}
    assert tags_of(s3_client, bucket, "empty.jpg") == {} and tags_of(s3_client, bucket, "ok.jpg") == {}

    def recorded(key):
        from modgate.verdict import Verdict as V

        return outcome(svc.redis, outcome_id(V.model_validate(by_key[key])))

    assert recorded("truncated.jpg") == {
        "tagged": {"modgate-decision": "error"},
        "quarantined_to": f"s3://{bucket}/quarantine/truncated.jpg",
    }
    assert "not found" in recorded("missing.jpg")["skipped"]
    assert recorded("empty.jpg") is None


def test_timeout_verdicts_whose_tagging_fails_record_the_failure(redis_server, s3_env):
    """A message that ran out of time and retries: its ``timeout`` verdicts are tagged, and
    when S3 cannot be reached that failure is the recorded outcome, not lost."""
    from concurrent.futures import Future
    from contextlib import nullcontext

    import boto3
    import redis
    from botocore.config import Config

    from modgate.settings import load_settings
    from tests.servers import free_port
    from worker.service.service import Service

    class Stuck:
        """Admitted at once, never finished; its S3 client points at a closed port."""

        def __init__(self):
            self.fetcher = type("F", (), {})()
            self.fetcher.client = boto3.client(
                "s3",
                endpoint_url=f"http://127.0.0.1:{free_port()}",
                region_name="us-east-1",
                config=Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=1),
            )

        def admission(self, cancel=None):
            return nullcontext(True)

        def submit(self, source, request_id=None, policy=None, cancel=None):
            return Future()

    r = redis.Redis.from_url(redis_server.url)
    r.flushall()
    settings = load_settings(
        redis={"url": redis_server.url},
        worker={
            "message_timeout_s": 0.5,
            "visibility_timeout_s": 31,
            "timeout_retries": 0,
            "metrics_port": 0,
        },
    )
    svc = Service(settings, ["modgate"], schedule=lambda d, c: None, redis=r)
    svc.pipeline = Stuck()
    svc.moderate("t-late", ({"items": [{"bucket": "bkt", "key": "a.jpg"}]},), {})
    (published,) = verdicts(r)
    assert published["error"]["code"] == "timeout"
    assert published["policy_actions"] == {"tag": {"modgate-decision": "error"}}
    recorded = outcome(r, outcome_id(Verdict.model_validate(published)))
    assert recorded is not None and "Could not connect" in recorded["error"]
