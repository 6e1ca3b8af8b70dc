"""modgate producers: the enqueue side (bucket backfill, S3 events via SQS, the HTTP event
receiver, a Lambda handler). They never import torch and send tasks by name.

Nothing is implemented here yet; issue #5 builds it on the message contract of #4.
"""
