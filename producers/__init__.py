"""modgate producers: the enqueue side (bucket backfill, S3 events via SQS, the HTTP event
receiver, a Lambda handler). They never import torch: they send ``modgate.moderate`` by
name with the message contract of ``modgate.contract``.
"""
