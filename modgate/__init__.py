"""modgate's light shared package: what the producers, the worker and the review console
agree on, and nothing heavier than pydantic and PyYAML (no torch, Pillow or numpy).

``contract`` (task and queue names, message payload), ``keys`` (every Redis key),
``settings`` (the one ``MODGATE_…`` settings class), ``policy`` (+ ``policy_default.yaml``,
``detector_scores``: the policy document and the scores it may name), ``verdict`` (schema
v1), ``errors`` (the error codes), ``signing`` (webhook signatures: sign, and verify for
receivers). Nothing here imports ``worker`` or ``producers``.
"""

__version__ = "0.1.0"
