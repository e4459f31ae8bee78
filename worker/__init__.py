"""The worker side: Celery app, thin tasks, the batch pipeline and the pinned-model pool."""
