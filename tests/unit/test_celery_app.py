"""The moderation task's answer to failures: a message whose work did not finish goes back
to the queue instead of being acknowledged."""

import ssl

import kombu.exceptions
import pytest
import redis
from celery.exceptions import Reject

from modgate.contract import MODERATE_TASK
from modgate.settings import load_settings
from worker.service import celery_app
from worker.service.service import Requeue


class Failing:
    def __init__(self, exc):
        self.exc = exc

    def moderate(self, task_id, args, kwargs):
        raise self.exc


@pytest.mark.parametrize(
    "exc",
    [
        kombu.exceptions.OperationalError("Error 111 connecting to redis"),  # scheduling a webhook
        redis.exceptions.OutOfMemoryError("OOM command not allowed"),  # the lease SET
        redis.ConnectionError("connection reset"),
        Requeue("2 of 3 items unfinished at the message timeout"),
    ],
)
def test_failures_while_finishing_requeue_the_message(exc, monkeypatch):
    app = celery_app.create_app(load_settings(redis={"url": "redis://127.0.0.1:1/0"}))
    monkeypatch.setattr(celery_app, "_service", Failing(exc))
    monkeypatch.setattr(celery_app.time, "sleep", lambda s: None)
    with pytest.raises(Reject) as raised:
        app.tasks[MODERATE_TASK].run({"items": []})
    assert raised.value.requeue is True


def _message_in_flight_when_redis_dies(server, transport):
    """What the consumer lives through when Redis restarts: a message of its connection is
    being worked on, Redis dies, the consumer collects the connection (kombu's
    ``Connection.collect``, as Celery does on a connection loss), Redis comes back."""
    import kombu

    conn = kombu.Connection(server.url, transport=transport)
    queue = conn.SimpleQueue("restart-test")
    queue.put({"n": 1})
    message = queue.get(timeout=5)
    server.kill()
    conn.collect(socket_timeout=0.5)
    server.start()
    return conn, message


def _close_as_the_consumer_does(conn) -> None:
    # Celery's Consumer.on_connection_error_after_connected: collect(), then close() with
    # connection errors ignored; anything else stops the worker ("Unrecoverable error").
    from kombu.common import ignore_errors

    ignore_errors(conn, conn.close)


def test_a_channel_of_a_lost_connection_fails_with_a_connection_error(tmp_path, caplog):
    import logging

    from tests.servers import RedisServer

    server = RedisServer(tmp_path / "redis", appendonly=True, appendfsync="always")
    try:
        conn, message = _message_in_flight_when_redis_dies(server, celery_app.RedisTransport)
        _close_as_the_consumer_does(conn)
        # A late reject (the task raised Reject(requeue=True) while Redis was away) is a
        # connection error, which Celery's reject_log_error logs instead of stopping the worker.
        with pytest.raises(conn.connection_errors):
            message.reject(requeue=True)
        with caplog.at_level(logging.CRITICAL):
            message.reject_log_error(logging.getLogger("test"), conn.connection_errors, requeue=True)
        # Nothing is lost: the message stays unacknowledged in Redis, where the
        # visibility-timeout sweep gives it back to the queue.
        assert redis.Redis.from_url(server.url).hlen("unacked") == 1
    finally:
        server.stop()


def test_kombus_own_redis_channel_still_loses_a_late_requeue(tmp_path):
    """The kombu bug ``RedisTransport`` works around: a reject(requeue=True) on a channel of
    a collected connection removes the message from the unacked set and fails to push it
    back. When this fails, kombu fixed it: drop ``_RedisChannel``."""
    from kombu.transport.redis import Transport

    from tests.servers import RedisServer

    server = RedisServer(tmp_path / "redis", appendonly=True, appendfsync="always")
    try:
        conn, message = _message_in_flight_when_redis_dies(server, Transport)
        _close_as_the_consumer_does(conn)
        message.reject(requeue=True)
        r = redis.Redis.from_url(server.url)
        assert (r.hlen("unacked"), r.llen("restart-test")) == (0, 0)
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6379/0", {"broker_transport": celery_app.RedisTransport}),
        (
            "rediss://cache.example:6379/0",
            {
                "broker_transport": celery_app.RedisTransport,
                "broker_use_ssl": {"ssl_cert_reqs": ssl.CERT_REQUIRED},
            },
        ),
        ("sentinel://127.0.0.1:26379", {}),
    ],
)
def test_the_fixed_transport_is_used_for_redis_urls(url, expected):
    app = celery_app.create_app(load_settings(redis={"url": url}))
    assert {k: app.conf[k] for k in expected} == expected
    if not expected:
        assert app.conf.broker_transport is None


def test_a_worker_that_stopped_on_an_error_exits_non_zero(monkeypatch):
    class Worker:
        exitcode = 1  # Celery's status after "Unrecoverable error"

    monkeypatch.setattr(celery_app, "_service", None)
    monkeypatch.setattr(celery_app, "_start_failed", False)
    celery_app._stop_service(sender=Worker())
    assert celery_app.exit_status() == 1
    Worker.exitcode = None  # a normal (warm) stop
    celery_app._stop_service(sender=Worker())
    assert celery_app.exit_status() == 0


def test_the_delivery_settings_the_manual_states():
    """docs/worker.md "Delivery guarantees": late acks, prefetch 1, 2 × max_batch threads,
    the visibility timeout and kombu's sweep every 5 s (not 100 s); a visibility timeout
    that does not cover a message + 30 s is refused."""
    from pydantic import ValidationError

    settings = load_settings(redis={"url": "redis://127.0.0.1:1/0"})
    app = celery_app.create_app(settings)
    conf = app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.worker_concurrency == 2 * settings.batch.max_batch
    options = conf.broker_transport_options
    assert options["visibility_timeout"] == settings.worker.visibility_timeout_s == 300
    assert options["unacked_restore_interval"] * options["unacked_restore_throttle"] == 5.0
    assert settings.worker.message_timeout_s == 240
    with pytest.raises(ValidationError, match="visibility_timeout_s"):
        load_settings(worker={"visibility_timeout_s": 100, "message_timeout_s": 80})
    app.close()
