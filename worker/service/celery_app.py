"""The Celery application: broker settings that make delivery at-least-once, the two task
names of the contract, and the signals that load models before consuming and drain on
SIGTERM.

``modgate worker`` runs it; ``celery -A worker.service.celery_app worker -Q modgate,modgate.webhooks``
works too (the ``app`` attribute is built on first access from the settings).

Delivery guarantees, and how the settings relate (docs/worker.md "Delivery guarantees"):

* ``task_acks_late``: a message is acknowledged when its task returns, i.e. after every
  verdict of the message is on the stream; a crash before that leaves it unacknowledged.
* ``visibility_timeout`` (``worker.visibility_timeout_s``, default 300 s): Redis hands an
  unacknowledged message out again after this long (plus at most one 5 s sweep). Settings
  refuse a value that is not at least ``worker.message_timeout_s`` + 30 s, the longest a
  message can take.
* ``worker_prefetch_multiplier`` 1 with ``worker.concurrency`` threads (default
  2 × ``batch.max_batch``): enough one-key messages in flight to fill a batch while the
  previous one runs, and little reserved work to redeliver after a crash.
* JSON only: pickle is refused on both sides.
* The broker transport is kombu's Redis transport with one fix (``RedisTransport``): a
  Redis restart under a running worker is a connection error the consumer recovers from,
  not an ``AttributeError`` that stops the worker.
"""

from __future__ import annotations

import logging
import ssl
import time
from typing import Any
from urllib.parse import urlsplit

import redis
from celery import Celery, signals
from celery.exceptions import Reject
from kombu.transport import redis as kombu_redis

from modgate.contract import MODERATE_QUEUE, MODERATE_TASK, WEBHOOK_QUEUE, WEBHOOK_TASK
from modgate.errors import ConfigError
from modgate.settings import Settings, load_settings

log = logging.getLogger(__name__)

# The exit status of a worker that cannot start (bad settings, missing weights), as
# `modgate`'s other commands use for infrastructure errors.
EXIT_CANNOT_START = 3

_service: Any = None
_app: Celery | None = None
_start_failed = False
# The exit status Celery chose for this process's worker (None: a normal stop); Celery's
# worker_main drops it, so `modgate worker` asks for it (see ``exit_status``).
_worker_exitcode: int | None = None


class _RedisChannel(kombu_redis.Channel):
    """kombu 5.7's Redis channel, made to fail with a connection error once its connection
    is gone (the one override of kombu internals in modgate; tests:
    tests/unit/test_celery_app.py, "lost connection").

    When the consumer loses Redis it calls ``Connection.collect()``, which sets the
    transport's ``client`` to None, while the channels of that connection stay in use: the
    consumer closes them again (``connection.close()`` restores their unacked messages) and
    the tasks still running ack or reject their messages on them when they finish. kombu
    then either raises AttributeError (``_connparams`` reads ``transport.client.hostname``
    to build a new pool), which is not a connection error, so Celery's ``ignore_errors``
    lets it through and the worker stops ("Unrecoverable error"); or, when the old pool is
    still there, a ``reject(requeue=True)`` reaches the restarted Redis, removes the
    message from the unacked set and fails to push it back (the closed channel has no
    exchange table): the message is lost. As a connection error, both are what Celery
    handles: the consumer reconnects, ``ack_log_error``/``reject_log_error`` log, and the
    message stays in Redis's unacked set, where the visibility-timeout sweep puts it back on
    the queue (at-least-once; a redelivery publishes nothing twice)."""

    def _require_connection(self) -> None:
        transport = self.connection
        if transport is None or transport.client is None:
            raise redis.ConnectionError("the broker connection of this channel is closed (Redis restarted?)")

    def conn_or_acquire(self, client: Any = None) -> Any:  # every ack, reject and restore
        self._require_connection()
        return super().conn_or_acquire(client)

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:  # every new pool
        self._require_connection()
        return super()._connparams(asynchronous=asynchronous)


class RedisTransport(kombu_redis.Transport):
    """kombu's Redis transport with ``_RedisChannel``."""

    Channel = _RedisChannel


def _broker_transport(url: str) -> dict[str, Any]:
    """Celery settings that select ``RedisTransport`` for a ``redis://``/``rediss://`` URL."""
    scheme = urlsplit(url).scheme
    if scheme not in ("redis", "rediss"):
        return {}
    conf: dict[str, Any] = {"broker_transport": RedisTransport}
    if scheme == "rediss":
        # kombu turns TLS on from the scheme name only, not for a transport class. Verified
        # like modgate's own redis-py clients of the same URL (redis-py's default), rather
        # than kombu's unverified default for rediss.
        conf["broker_use_ssl"] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    return conf


def current_service() -> Any:
    if _service is None:
        raise RuntimeError("the modgate service is not started (run the worker through `modgate worker`)")
    return _service


def create_app(settings: Settings | None = None, pipeline_factory: Any = None) -> Celery:
    """A Celery app for ``settings``; ``pipeline_factory`` replaces the model pipeline (benchmarks)."""
    settings = settings or load_settings()
    app = Celery("modgate", broker=settings.redis.url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        task_default_queue=MODERATE_QUEUE,
        task_routes={MODERATE_TASK: {"queue": MODERATE_QUEUE}, WEBHOOK_TASK: {"queue": WEBHOOK_QUEUE}},
        worker_pool="threads",
        worker_concurrency=settings.worker.threads(settings.batch.max_batch),
        worker_prefetch_multiplier=settings.worker.prefetch_multiplier,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        **_broker_transport(settings.redis.url),
        broker_transport_options={
            "visibility_timeout": settings.worker.visibility_timeout_s,
            # kombu sweeps for expired unacknowledged messages every interval × throttle
            # seconds (default 10 × 10): with these a crashed worker's messages are back
            # within the visibility timeout + at most 5 s, not + 100 s.
            "unacked_restore_interval": max(1.0, min(5.0, settings.worker.visibility_timeout_s / 20)),
            "unacked_restore_throttle": 1,
        },
    )
    app.modgate_settings = settings  # type: ignore[attr-defined]
    app.modgate_pipeline_factory = pipeline_factory  # type: ignore[attr-defined]

    @app.task(name=MODERATE_TASK, bind=True)
    def moderate(self: Any, *args: Any, **kwargs: Any) -> dict[str, int]:
        import kombu.exceptions

        from worker.service.service import Requeue

        try:
            return current_service().moderate(self.request.id, args, kwargs)
        except Requeue as exc:
            raise Reject(str(exc), requeue=True) from None
        except (redis.RedisError, kombu.exceptions.OperationalError) as exc:
            # Redis (results, outbox, OOM on a SET) or the broker (scheduling a webhook)
            # failed before the message was done: put it back rather than acknowledge work
            # that did not happen. Its redelivery publishes nothing twice.
            log.error("%s while finishing a message (%s); message requeued", type(exc).__name__, exc)
            time.sleep(1.0)
            raise Reject(f"{type(exc).__name__}: {exc}", requeue=True) from None

    @app.task(name=WEBHOOK_TASK, bind=True)
    def deliver_webhook(self: Any, *args: Any, **kwargs: Any) -> str:
        from worker.service.service import Requeue

        payload = args[0] if len(args) == 1 and not kwargs else kwargs
        try:
            return current_service().deliver(payload)
        except Requeue as exc:
            # Redis or the broker failed mid-delivery: acking would lose the delivery.
            log.error("%s; webhook task requeued", exc)
            time.sleep(1.0)
            raise Reject(str(exc), requeue=True) from None

    return app


def schedule_webhook(app: Celery) -> Any:
    def schedule(delivery: Any, countdown: float) -> None:
        app.send_task(
            WEBHOOK_TASK,
            args=[delivery.model_dump(mode="json")],
            queue=WEBHOOK_QUEUE,
            countdown=countdown if countdown > 0 else None,
        )

    return schedule


def resend_moderation(app: Celery) -> Any:
    def resend(task_id: str, payload: Any) -> None:
        app.send_task(MODERATE_TASK, args=[payload], queue=MODERATE_QUEUE, task_id=task_id)

    return resend


@signals.setup_logging.connect
def _setup_logging(loglevel: Any = logging.INFO, **_: Any) -> None:
    from worker.observe.logs import setup_logging

    settings = _app.modgate_settings if _app is not None else None  # type: ignore[attr-defined]
    level = (
        logging.getLevelName(loglevel.upper()) if isinstance(loglevel, str) else (loglevel or logging.INFO)
    )
    setup_logging(settings.worker.log_format if settings is not None else "json", level)


@signals.celeryd_after_setup.connect
def _start_service(sender: str, instance: Any, **_: Any) -> None:
    """Before the first message is consumed: load models, start heartbeat and metrics."""
    global _service
    from worker.service.service import Service

    app = instance.app
    settings = getattr(app, "modgate_settings", None)
    if settings is None:
        return  # not a modgate app
    queues = sorted(app.amqp.queues.consume_from or app.amqp.queues)
    try:
        _service = Service(
            settings,
            queues,
            schedule_webhook(app),
            pipeline_factory=app.modgate_pipeline_factory,
            resend=resend_moderation(app),
        )
        _service.start()
    except Exception as exc:
        # Celery logs and swallows what a signal handler raises, and would then consume
        # messages with no models loaded. SystemExit is the one thing it lets through: the
        # worker stops before its first message, with the reason, and the orchestrator sees it.
        global _start_failed
        _start_failed = True
        log.critical("worker cannot start: %s", exc, exc_info=not isinstance(exc, ConfigError))
        raise SystemExit(EXIT_CANNOT_START) from None


def start_failed() -> bool:
    """True when this process's worker stopped because the service could not start."""
    return _start_failed


def exit_status() -> int:
    """The exit status this process's worker must end with: ``EXIT_CANNOT_START`` when the
    service could not start, Celery's own non-zero status when the worker stopped on an
    error ("Unrecoverable error" is 1), else 0. An orchestrator restarts a non-zero exit."""
    if _start_failed:
        return EXIT_CANNOT_START
    return _worker_exitcode or 0


@signals.worker_shutting_down.connect
def _drain(**_: Any) -> None:
    if _service is not None:
        _service.begin_drain()


@signals.worker_shutdown.connect
def _stop_service(sender: Any = None, **_: Any) -> None:
    global _worker_exitcode
    code = getattr(sender, "exitcode", None)
    _worker_exitcode = code if isinstance(code, int) else None
    if _service is not None:
        _service.close()


def __getattr__(name: str) -> Any:
    # `celery -A worker.service.celery_app` looks up `app`; build it lazily so importing this
    # module (tests, `modgate worker`) does not read settings twice.
    global _app
    if name in ("app", "celery"):
        if _app is None:
            _app = create_app()
        return _app
    raise AttributeError(name)


def set_app(app: Celery) -> None:
    global _app
    _app = app
