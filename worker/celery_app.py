"""The Celery application: broker settings that make delivery at-least-once, the two task
names of the contract, and the signals that load models before consuming and drain on
SIGTERM.

``modgate worker`` runs it; ``celery -A worker.celery_app worker -Q modgate,modgate.webhooks``
works too (the ``app`` attribute is built on first access from the settings).

Delivery guarantees, and how the settings relate (README "Delivery guarantees"):

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
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Celery, signals
from celery.exceptions import Reject

from worker.contract import MODERATE_QUEUE, MODERATE_TASK, WEBHOOK_QUEUE, WEBHOOK_TASK
from worker.errors import ConfigError
from worker.settings import Settings, load_settings

log = logging.getLogger(__name__)

# The exit status of a worker that cannot start (bad settings, missing weights), as
# `modgate`'s other commands use for infrastructure errors.
EXIT_CANNOT_START = 3

_service: Any = None
_app: Celery | None = None
_start_failed = False


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
        import redis

        from worker.service import Requeue

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
        from worker.service import Requeue

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
    from worker.logs import setup_logging

    settings = _app.modgate_settings if _app is not None else None  # type: ignore[attr-defined]
    level = (
        logging.getLevelName(loglevel.upper()) if isinstance(loglevel, str) else (loglevel or logging.INFO)
    )
    setup_logging(settings.worker.log_format if settings is not None else "json", level)


@signals.celeryd_after_setup.connect
def _start_service(sender: str, instance: Any, **_: Any) -> None:
    """Before the first message is consumed: load models, start heartbeat and metrics."""
    global _service
    from worker.service import Service

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


@signals.worker_shutting_down.connect
def _drain(**_: Any) -> None:
    if _service is not None:
        _service.begin_drain()


@signals.worker_shutdown.connect
def _stop_service(**_: Any) -> None:
    if _service is not None:
        _service.close()


def __getattr__(name: str) -> Any:
    # `celery -A worker.celery_app` looks up `app`; build it lazily so importing this
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
