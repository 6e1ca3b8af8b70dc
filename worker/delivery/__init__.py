"""Delivery: verdicts out — the results stream, signed webhooks, S3 actions."""
