"""Ingest: bytes in, frames out — fetch (files, S3, the lean GET client), the container
probe and decode budget, PIL decode on threads and in killable decode processes."""
