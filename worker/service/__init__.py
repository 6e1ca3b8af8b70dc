"""The queue-driven service: the Celery app and what one message does, end to end."""
