"""The moderation task's answer to failures: a message whose work did not finish goes back
to the queue instead of being acknowledged."""

import kombu.exceptions
import pytest
import redis
from celery.exceptions import Reject

from worker import celery_app
from worker.contract import MODERATE_TASK
from worker.service import Requeue
from worker.settings import load_settings


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
