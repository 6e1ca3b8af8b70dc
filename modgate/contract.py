"""The message contract between producers and workers: task names, queue names and the
``modgate.moderate`` payload.

Producers import this module without the rest of the worker, so it imports nothing but
pydantic and the standard library. Messages travel as JSON only.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, ValidationError

MODERATE_TASK = "modgate.moderate"
MODERATE_QUEUE = "modgate"
WEBHOOK_TASK = "modgate.deliver_webhook"
WEBHOOK_QUEUE = "modgate.webhooks"


def task_sender_app(redis_url: str, name: str) -> Any:
    """A Celery app that only sends tasks by name, as JSON (producers, the console): it knows
    nothing of the worker's code. Publishing fails within ~1 s when Redis is down, so callers
    can leave an event for redelivery or tell a reviewer, rather than hang."""
    from celery import Celery

    app = Celery(name, broker=redis_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.3},
        broker_connection_retry_on_startup=True,
    )
    return app


# Keys a message; producers batch up to this many, workers may be configured lower or higher.
DEFAULT_MAX_ITEMS = 64


class Item(BaseModel):
    """One S3 object to moderate. ETag and size from a listing or an event save a HEAD
    and let the worker refuse oversized objects before downloading them."""

    model_config = ConfigDict(extra="forbid")

    bucket: str = Field(min_length=3, max_length=255)
    key: str = Field(min_length=1, max_length=1024)
    version_id: str | None = Field(None, max_length=1024)
    etag: str | None = Field(None, max_length=256)
    size: int | None = Field(None, ge=0)


class ModerateMessage(BaseModel):
    """Payload of ``modgate.moderate``: the task's single positional argument."""

    model_config = ConfigDict(extra="forbid")

    items: list[Item] = Field(min_length=1)
    request_id: str | None = Field(None, max_length=256)
    tenant: str | None = Field(None, max_length=128)
    callback_url: HttpUrl | None = None
    # Name of a policy configured on the workers (``policies`` setting); None = the default.
    policy: str | None = Field(None, max_length=128)


def validate_message(payload: Any, max_items: int = DEFAULT_MAX_ITEMS) -> ModerateMessage:
    """Parse a payload as it arrived; raises ``ValueError`` (incl. ``ValidationError``) with the reason."""
    message = ModerateMessage.model_validate(payload)
    if len(message.items) > max_items:
        raise ValueError(f"message carries {len(message.items)} items, more than the limit of {max_items}")
    return message


def chunk_items(items: list[Item], size: int = DEFAULT_MAX_ITEMS) -> list[list[Item]]:
    if size < 1:
        raise ValueError("size must be at least 1")
    return [items[i : i + size] for i in range(0, len(items), size)]


__all__ = [
    "DEFAULT_MAX_ITEMS",
    "MODERATE_QUEUE",
    "MODERATE_TASK",
    "WEBHOOK_QUEUE",
    "WEBHOOK_TASK",
    "Item",
    "ModerateMessage",
    "ValidationError",
    "chunk_items",
    "validate_message",
]
