"""The review backend as deployed: a decision taken with modgate/review.py against a real
redis-server and S3 (moto's server over HTTP), its ``verdict.reviewed`` webhook carried by a
real ``modgate worker -Q modgate.webhooks`` process to a real HTTP receiver, verified there
with modgate's own verifier and with the Standard Webhooks and Stripe libraries."""

import hashlib
import json

import pytest
import standardwebhooks
import stripe
from celery import Celery

from modgate import keys, quarantine
from modgate.bank_store import BankStore
from modgate.envelope import celery_sender
from modgate.policy import PolicyActions, QuarantineAction
from modgate.review import ReviewedEvent, decide
from modgate.settings import load_settings
from modgate.signing import standard_secret, verify
from modgate.verdict import Source, Verdict, verdict_id
from tests.helpers import wait_for
from tests.integration.test_worker import SECRET, env, r  # noqa: F401 (fixtures)
from tests.servers import WebhookReceiver
from worker.delivery.actions import ObjectActions, record_outcome


@pytest.fixture
def sender(redis_server):
    app = Celery(broker=redis_server.url, set_as_current=False)
    app.conf.task_serializer = "json"
    yield celery_sender(app)
    app.close()


@pytest.fixture
def receiver():
    hook = WebhookReceiver()
    yield hook
    hook.stop()


def settings_for(env, **policy):  # noqa: F811
    return load_settings(
        redis={"url": env["MODGATE_REDIS__URL"]},
        s3={"endpoint_url": env["MODGATE_S3__ENDPOINT_URL"]},
        webhook={"secret": SECRET},
        policy=policy or None,
    )


def upload_and_judge(s3_client, bucket, key, body, settings, decision="unsafe"):
    s3_client.put_object(Bucket=bucket, Key=key, Body=body)
    etag = s3_client.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
    source = Source(
        kind="s3",
        uri=f"s3://{bucket}/{key}",
        bucket=bucket,
        key=key,
        etag=etag,
        sha256=hashlib.sha256(body).hexdigest(),
        size=len(body),
    )
    version = settings.policy.version
    return Verdict(
        id=verdict_id(source, version), source=source, status="ok", decision=decision, policy_version=version
    )


def publish_time_record(r, verdict, url, tenant=None):  # noqa: F811
    """What the worker writes when it publishes a verdict with webhooks (keys.verdict_meta)."""
    r.set(keys.verdict_meta(verdict.id), json.dumps({"tenant": tenant, "urls": [url], "entry_id": "1-0"}))


def received_event(hook):
    """The one delivery at ``hook``, checked the way receivers check it; its parsed body."""
    (req,) = hook.delivered()
    headers, body = req["headers"], req["body"]
    assert headers["Modgate-Event-Type"] == "verdict.reviewed"
    assert verify(SECRET, body, headers["Modgate-Signature"])
    assert standardwebhooks.Webhook(standard_secret(SECRET)).verify(body, headers) == json.loads(body)
    assert stripe.WebhookSignature.verify_header(body, headers["Modgate-Signature"], SECRET, tolerance=300)
    event = ReviewedEvent.model_validate_json(body)
    assert headers["Modgate-Event-Id"].startswith(f"{event.verdict.id}:review:")
    assert headers["Modgate-Verdict-Id"] == event.verdict.id
    return event


def test_overturning_a_quarantined_verdict_releases_it_allow_lists_it_and_sends_a_signed_event(
    env,  # noqa: F811
    r,  # noqa: F811
    s3_client,
    bucket,
    workers,
    sender,
    receiver,
):
    settings = settings_for(env)
    body = b"bytes a reviewer will call safe"
    verdict = upload_and_judge(s3_client, bucket, "up/photo.jpg", body, settings)
    # The worker's own quarantine and the outcome record it keeps per verdict.
    moved = ObjectActions(s3_client).apply(
        verdict, PolicyActions(tag=True, quarantine=QuarantineAction(prefix="held/"))
    )
    assert moved["quarantined_to"] == f"s3://{bucket}/held/up/photo.jpg"
    record_outcome(r, verdict.id, moved, 3600)
    publish_time_record(r, verdict, receiver.url)
    workers(env, name="dispatcher", queues="modgate.webhooks")

    result = decide(r, settings, verdict, "ana", "safe", None, s3=s3_client, send_task=sender)

    assert result.accepted and result.webhook_note is None
    assert result.decision.s3 == {
        "released_to": f"s3://{bucket}/up/photo.jpg",
        "released_from": f"s3://{bucket}/held/up/photo.jpg",
        "tagged": {"modgate-decision": "safe"},
    }
    # Back at its key, bytes and all; the quarantined copy is gone.
    assert s3_client.get_object(Bucket=bucket, Key="up/photo.jpg")["Body"].read() == body
    assert s3_client.list_objects_v2(Bucket=bucket, Prefix="held/").get("KeyCount") == 0
    tags = s3_client.get_object_tagging(Bucket=bucket, Key="up/photo.jpg")["TagSet"]
    assert {"Key": "modgate-decision", "Value": "safe"} in tags
    # Its SHA-256 is allow-listed, so the release's own upload event is not quarantined again.
    store = BankStore(r, settings.banks)
    assert [e.hash for e in store.entries("review-allow")] == [hashlib.sha256(body).hexdigest()]
    assert store.spec("review-allow").action == "safe"

    wait_for(lambda: receiver.delivered(), what="the verdict.reviewed webhook")
    event = received_event(receiver)
    assert event.verdict == verdict
    assert event.review.decision == "safe" and event.review.reviewer == "ana"
    assert event.review.s3 == result.decision.s3
    assert receiver.delivered()[0]["headers"]["Modgate-Event-Id"] == result.event_id

    # A second reviewer sees the first decision; releasing again is a no-op.
    late = decide(r, settings, verdict, "ben", "unsafe", "violence", s3=s3_client, send_task=sender)
    assert not late.accepted and late.decision.reviewer == "ana" and late.decision.s3 == result.decision.s3
    again = quarantine.release(s3_client, f"s3://{bucket}/held/up/photo.jpg", bucket, "up/photo.jpg")
    assert again == f"s3://{bucket}/up/photo.jpg"
    assert s3_client.get_object(Bucket=bucket, Key="up/photo.jpg")["Body"].read() == body


def test_an_unsafe_decision_quarantines_where_the_policy_has_a_quarantine_and_tags_where_not(
    env,  # noqa: F811
    r,  # noqa: F811
    s3_client,
    bucket,
    workers,
    sender,
):
    hooks = [WebhookReceiver(), WebhookReceiver()]
    workers(env, name="dispatcher", queues="modgate.webhooks")
    quarantining = settings_for(env, actions={"quarantine": {"prefix": "held/"}})
    missed = upload_and_judge(s3_client, bucket, "up/missed.jpg", b"missed", quarantining, decision="review")
    publish_time_record(r, missed, hooks[0].url)
    result = decide(r, quarantining, missed, "ana", "unsafe", "sexual", s3=s3_client, send_task=sender)
    assert result.decision.s3 == {"quarantined_to": f"s3://{bucket}/held/up/missed.jpg"}
    assert s3_client.get_object(Bucket=bucket, Key="held/up/missed.jpg")["Body"].read() == b"missed"
    assert s3_client.list_objects_v2(Bucket=bucket, Prefix="up/").get("KeyCount") == 0

    tagging = settings_for(env)
    other = upload_and_judge(s3_client, bucket, "up/other.jpg", b"other", tagging, decision="review")
    publish_time_record(r, other, hooks[1].url)
    result = decide(r, tagging, other, "ana", "unsafe", "violence", s3=s3_client, send_task=sender)
    assert result.decision.s3 == {"tagged": {"modgate-decision": "unsafe"}}
    tags = s3_client.get_object_tagging(Bucket=bucket, Key="up/other.jpg")["TagSet"]
    assert {"Key": "modgate-decision", "Value": "unsafe"} in tags
    assert BankStore(r, tagging.banks).state("review-allow") is None  # unsafe allow-lists nothing

    wait_for(lambda: all(h.delivered() for h in hooks), what="both verdict.reviewed webhooks")
    first, second = (received_event(h) for h in hooks)
    assert (first.review.category, first.review.s3) == (
        "sexual",
        {"quarantined_to": f"s3://{bucket}/held/up/missed.jpg"},
    )
    assert (second.review.category, second.verdict) == ("violence", other)
    for hook in hooks:
        hook.stop()


def test_release_never_overwrites_an_object_uploaded_to_the_key_since(s3_client, bucket):
    s3_client.put_object(Bucket=bucket, Key="k.jpg", Body=b"judged")
    held = quarantine.quarantine(s3_client, bucket, "k.jpg", "held/")
    s3_client.put_object(Bucket=bucket, Key="k.jpg", Body=b"a newer upload")
    with pytest.raises(quarantine.MoveError, match="already holds another object"):
        quarantine.release(s3_client, held, bucket, "k.jpg")
    assert s3_client.get_object(Bucket=bucket, Key="k.jpg")["Body"].read() == b"a newer upload"
    assert s3_client.get_object(Bucket=bucket, Key="held/k.jpg")["Body"].read() == b"judged"
