"""modgate console: the review web app for moderators (``modgate console``, docs/review.md).

A deployable of its own: it imports the light shared package ``modgate`` and its web,
Redis, S3 and Celery clients, never the worker (no torch, no models, no image decoding).
"""
