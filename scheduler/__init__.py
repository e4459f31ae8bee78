"""The submit side: Python client, dispatch, reconciler, the ``aigc`` CLI. It never imports torch."""

from scheduler.client import Client

__all__ = ["Client"]
