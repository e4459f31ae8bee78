"""The OpenAI-compatible HTTP API (``aigc serve``): /v1 files, batches and models over the Client's
database and store. It never generates: batches become jobs that workers run."""

from scheduler.api.app import create_app

__all__ = ["create_app"]
