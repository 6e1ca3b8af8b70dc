"""Review decisions (modgate/review.py) against a real redis-server: first decision wins under
concurrency, the reviews stream stays bounded, the labels export reads back through
``modgate eval``'s own reader, and a missing or malformed publish-time record costs the
webhook, never the decision."""

import hashlib
import json
import threading
import time

import pytest
import redis
from pydantic import ValidationError

from modgate import keys
from modgate.bank_store import BankStore
from modgate.envelope import EVENT_TYPE_HEADER, VERDICT_REVIEWED, Delivery
from modgate.review import ReviewedEvent, decide, decided, export_labels, read_meta, resume_incomplete
from modgate.settings import load_settings
from modgate.signing import verify_headers
from modgate.verdict import Source, Verdict, verdict_id
from worker.quality.labels import read_labels

SECRET = "review-secret-0123456789"


@pytest.fixture
def r(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    return client


@pytest.fixture
def settings(redis_server):
    return load_settings(redis={"url": redis_server.url}, webhook={"secret": SECRET})


class Sent(list):
    """A ``send_task`` that keeps what it was handed."""

    def __call__(self, delivery: Delivery) -> None:
        self.append(delivery)


def make_verdict(settings, key="img/a.jpg", decision="review", bucket="bkt", sha=True):
    source = Source(
        kind="s3",
        uri=f"s3://{bucket}/{key}",
        bucket=bucket,
        key=key,
        etag="e" * 32,
        sha256=hashlib.sha256(key.encode()).hexdigest() if sha else None,
    )
    version = settings.policy.version
    return Verdict(
        id=verdict_id(source, version), source=source, status="ok", decision=decision, policy_version=version
    )


def put_meta(r, vid, urls, tenant=None):
    r.set(keys.verdict_meta(vid), json.dumps({"tenant": tenant, "urls": urls, "entry_id": "1-0"}))


def test_a_decision_must_be_one(r, settings):
    v = make_verdict(settings)
    for decision, category in (
        ("unsafe", None),
        ("unsafe", "not_a_category"),
        ("safe", "sexual"),
        ("skip", None),
    ):
        with pytest.raises(ValidationError):
            decide(r, settings, v, "ana", decision, category, send_task=Sent())
    assert r.xlen(keys.REVIEWS) == 0 and decided(r, v.id) is None


def test_first_decision_wins_between_two_concurrent_reviewers(r, settings):
    sent = Sent()
    verdicts = [make_verdict(settings, key=f"k{i}.jpg") for i in range(40)]
    for v in verdicts:
        put_meta(r, v.id, ["http://receiver.example/hook"])
    for v in verdicts:
        results = {}
        barrier = threading.Barrier(2)

        def review(who, decision, category, v=v, results=results, barrier=barrier):
            barrier.wait()
            results[who] = decide(r, settings, v, who, decision, category, send_task=sent)

        threads = [
            threading.Thread(target=review, args=("ana", "safe", None)),
            threading.Thread(target=review, args=("ben", "unsafe", "violence")),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        won = [who for who, res in results.items() if res.accepted]
        assert len(won) == 1, results
        (lost,) = set(results) - set(won)
        winner = results[won[0]].decision
        # The second reviewer sees the first decision, not their own.
        assert results[lost].decision.reviewer == won[0] == winner.reviewer
        assert results[lost].decision.decision == winner.decision
        assert decided(r, v.id).reviewer == won[0]
    # One stream entry and one webhook per verdict: the losers recorded and sent nothing.
    assert r.xlen(keys.REVIEWS) == len(verdicts)
    assert len(sent) == len(verdicts)
    assert len({d.event_id for d in sent}) == len(verdicts)


def test_the_reviews_stream_is_bounded(r, redis_server):
    settings = load_settings(redis={"url": redis_server.url}, review={"reviews_maxlen": 50})
    for i in range(600):
        decide(r, settings, make_verdict(settings, key=f"b{i}.jpg"), "ana", "safe", None, send_task=Sent())
    # MAXLEN ~ trims whole stream nodes (100 entries each by default): at least the bound is kept.
    assert 50 <= r.xlen(keys.REVIEWS) <= 50 + 100


def test_a_good_record_queues_one_signed_verdict_reviewed_delivery_per_url(r, settings):
    v = make_verdict(settings)
    put_meta(r, v.id, ["http://a.example/h", "http://b.example/h", "http://a.example/h"], tenant="t1")
    sent = Sent()
    result = decide(r, settings, v, "ana", "unsafe", "violence", send_task=sent)
    assert result.accepted and result.webhook_note is None
    (entry_id,) = [e.decode() for e, _ in r.xrange(keys.REVIEWS)]
    assert result.event_id == f"{v.id}:review:{entry_id}"
    assert sorted(d.url for d in sent) == ["http://a.example/h", "http://b.example/h"]
    for delivery in sent:
        assert delivery.event_type == VERDICT_REVIEWED and delivery.tenant == "t1"
        assert delivery.event_id == result.event_id and delivery.verdict_id == v.id
        # Noted as pending before the task was sent, so the reconciler can re-send it.
        assert r.zscore(keys.WEBHOOK_PENDING, delivery.delivery_id) is not None
        stored = r.hget(keys.WEBHOOK_PENDING_PAYLOADS, delivery.delivery_id)
        assert Delivery.model_validate_json(stored) == delivery
        headers = delivery.headers(settings.webhook, 1_700_000_000)
        assert headers[EVENT_TYPE_HEADER] == "verdict.reviewed"
        event = ReviewedEvent.model_validate_json(delivery.body)
        assert event.type == "verdict.reviewed" and event.verdict == v
        assert (event.review.reviewer, event.review.decision, event.review.category) == (
            "ana",
            "unsafe",
            "violence",
        )
    # Signed at send time with the tenant's secrets (here the default one: t1 has none of its own).
    delivery = sent[0]
    headers = delivery.headers(settings.webhook, 1_700_000_000)
    assert verify_headers(SECRET, delivery.body.encode(), headers, now=1_700_000_000)


@pytest.mark.parametrize(
    "raw, why",
    [
        (None, "no publish-time record"),
        (b"{not json", "not JSON"),
        (b'["a list"]', "not a JSON object"),
        (b'{"tenant": 5, "urls": ["http://a.example/h"]}', "tenant is not a string"),
        (b'{"tenant": null, "urls": "http://a.example/h"}', "no list of URLs"),
        (b'{"tenant": null, "urls": [7, "ftp://x/y"]}', "no webhook URL"),
    ],
)
def test_a_missing_or_malformed_record_costs_the_webhook_not_the_decision(r, settings, raw, why):
    v = make_verdict(settings)
    if raw is not None:
        r.set(keys.verdict_meta(v.id), raw)
    sent = Sent()
    result = decide(r, settings, v, "ana", "safe", None, send_task=sent)
    assert result.accepted and result.event_id is None and result.deliveries == ()
    assert why in result.webhook_note
    assert sent == [] and r.zcard(keys.WEBHOOK_PENDING) == 0
    assert decided(r, v.id).decision == "safe" and r.xlen(keys.REVIEWS) == 1
    assert read_meta(r, v.id)[1] == []


def test_a_decision_cut_short_is_finished_by_the_same_reviewer_only(r, settings):
    v = make_verdict(settings)
    put_meta(r, v.id, ["http://a.example/h"])

    def broker_down(delivery):
        raise ConnectionError("broker unreachable")

    with pytest.raises(ConnectionError):
        decide(r, settings, v, "ana", "unsafe", "violence", send_task=broker_down)
    # Another reviewer cannot take over a decided item, even an unfinished one.
    other = decide(r, settings, v, "ben", "safe", None, send_task=Sent())
    assert not other.accepted and other.decision.reviewer == "ana"
    sent = Sent()
    again = decide(r, settings, v, "ana", "unsafe", "violence", send_task=sent)
    assert again.accepted and again.resumed
    (entry_id,) = [e.decode() for e, _ in r.xrange(keys.REVIEWS)]
    assert again.event_id == f"{v.id}:review:{entry_id}" and len(sent) == 1
    # Complete now: a repeat is refused like any second decision.
    assert not decide(r, settings, v, "ana", "unsafe", "violence", send_task=Sent()).accepted


def test_a_decision_whose_process_died_is_finished_by_the_sweeper(r, settings, caplog):
    v = make_verdict(settings)
    gone = make_verdict(settings, key="gone.jpg")
    put_meta(r, v.id, ["http://a.example/h"])
    put_meta(r, gone.id, ["http://a.example/h"])

    def died(delivery):
        raise SystemExit("the console process was killed here")

    for verdict in (v, gone):
        with pytest.raises(SystemExit):
            decide(r, settings, verdict, "ana", "unsafe", "violence", send_task=died)
    assert r.zcard(keys.REVIEW_INCOMPLETE) == 2
    known = {v.id: v}
    sent = Sent()
    # Not before review.resume_after_s: the deciding process may still be at work.
    assert resume_incomplete(r, settings, known.get, send_task=sent) == [] and sent == []
    later = time.time() + settings.review.resume_after_s + 1
    (result,) = resume_incomplete(r, settings, known.get, send_task=sent, now=later)
    assert result.accepted and result.resumed and result.decision.reviewer == "ana"
    assert [d.verdict_id for d in sent] == [v.id] and sent[0].event_type == VERDICT_REVIEWED
    assert "cannot be finished: the verdict is gone" in caplog.text
    assert r.zcard(keys.REVIEW_INCOMPLETE) == 0
    # Finished: a second round and the reviewer deciding again change nothing.
    assert resume_incomplete(r, settings, known.get, send_task=sent, now=later) == [] and len(sent) == 1
    assert not decide(r, settings, v, "ana", "unsafe", "violence", send_task=sent).accepted


def test_one_decision_that_cannot_be_finished_does_not_hold_up_the_others(r, settings):
    stuck, other = make_verdict(settings, key="stuck.jpg"), make_verdict(settings, key="other.jpg")
    for v in (stuck, other):
        put_meta(r, v.id, ["http://a.example/h"])

    def died(delivery):
        raise SystemExit("killed")

    for v in (stuck, other):
        with pytest.raises(SystemExit):
            decide(r, settings, v, "ana", "unsafe", "violence", send_task=died)
    r.zadd(keys.REVIEW_INCOMPLETE, {stuck.id: 0})  # the oldest: first in every round
    sent = Sent()

    def refuses_stuck(delivery):
        if delivery.verdict_id == stuck.id:
            raise ConnectionError("its webhook queue is down")
        sent(delivery)

    known = {stuck.id: stuck, other.id: other}
    later = time.time() + settings.review.resume_after_s + 1
    (done,) = resume_incomplete(r, settings, known.get, send_task=refuses_stuck, now=later)
    assert done.decision.verdict_id == other.id and [d.verdict_id for d in sent] == [other.id]
    assert [m.decode() for m in r.zrange(keys.REVIEW_INCOMPLETE, 0, -1)] == [stuck.id]  # retried later


def test_overturn_to_safe_allow_lists_the_sha256_once_a_confirmation_does_not(r, settings):
    overturned = make_verdict(settings, key="o.jpg", decision="unsafe")
    result = decide(r, settings, overturned, "ana", "safe", None, send_task=Sent())
    assert result.allow_listed == overturned.source.sha256
    store = BankStore(r, settings.banks)
    spec = store.spec("review-allow")
    assert (spec.kind, spec.action) == ("sha256", "safe")
    assert [e.hash for e in store.entries("review-allow")] == [overturned.source.sha256]
    confirmed = make_verdict(settings, key="s.jpg", decision="safe")
    assert decide(r, settings, confirmed, "ana", "safe", None, send_task=Sent()).allow_listed is None
    no_hash = make_verdict(settings, key="n.jpg", decision="review", sha=False)
    result = decide(r, settings, no_hash, "ana", "safe", None, send_task=Sent())
    assert result.allow_listed is None and "no SHA-256" in result.allow_note
    assert store.state("review-allow").count == 1


def test_the_export_is_a_labels_file_modgate_eval_reads(r, settings, tmp_path):
    a = make_verdict(settings, key="dir/a.jpg")
    b = make_verdict(settings, key="dir/with,comma.jpg")
    c = make_verdict(settings, key="dir/c.jpg")
    decide(r, settings, a, "ana", "unsafe", "sexual", send_task=Sent())
    decide(r, settings, b, "ana", "safe", None, send_task=Sent())
    decide(r, settings, c, "ana", "unsafe", "violence", send_task=Sent())
    # c decided again once its decision expired: the export keeps the latest.
    r.delete(keys.review_decided(c.id))
    decide(r, settings, c, "ben", "safe", None, send_task=Sent())
    lines = list(export_labels(r))
    assert lines[0] == "uri,label,category\n"
    path = tmp_path / "labels.csv"
    path.write_text("".join(lines))
    labels = read_labels(path)
    assert labels.style == "unsafebench"
    got = {row.uri: (row.unsafe, [cat for cat, v in row.truth.items() if v]) for row in labels.rows}
    assert got == {
        "s3://bkt/dir/a.jpg": (True, ["sexual"]),
        "s3://bkt/dir/with,comma.jpg": (False, []),
        "s3://bkt/dir/c.jpg": (False, []),
    }
    assert labels.duplicate_uris.count == 0 and labels.unsafe_without_category.count == 0


def test_the_export_window(r, settings):
    v = make_verdict(settings)
    decision = decide(r, settings, v, "ana", "safe", None, send_task=Sent()).decision
    assert len(list(export_labels(r, since=decision.at - 1, until=decision.at + 1))) == 2
    assert list(export_labels(r, since=decision.at + 10)) == ["uri,label,category\n"]
    assert list(export_labels(r, until=decision.at - 10)) == ["uri,label,category\n"]
