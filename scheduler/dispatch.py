"""Send chunk messages by task name: the scheduler never imports the worker or torch."""

from __future__ import annotations

from functools import cached_property
from typing import Any

TASK = "worker.run_chunk"


class CeleryPublisher:
    """Publishes ``worker.run_chunk(job_id, chunk_no)``: ids only, JSON only."""

    def __init__(self, broker_url: str, visibility_timeout_s: int = 3600, ssl: dict[str, Any] | None = None):
        self.broker_url = broker_url
        self.visibility_timeout_s = visibility_timeout_s
        self.ssl = ssl  # Settings.broker_ssl(): TLS options for a rediss:// broker

    @cached_property
    def app(self):
        from celery import Celery

        app = Celery("aigc-client", broker=self.broker_url)
        app.conf.update(
            task_serializer="json", accept_content=["json"], task_ignore_result=True,
            broker_transport_options={"visibility_timeout": self.visibility_timeout_s},
            broker_connection_retry_on_startup=False, broker_use_ssl=self.ssl,
        )
        return app

    def __call__(self, queue: str, job_id: str, chunk_no: int) -> None:
        # A short retry: when the broker is down the outbox keeps the chunk, the reconciler sends it later.
        self.app.send_task(
            TASK, args=[job_id, chunk_no], queue=queue, retry=True,
            # Flower's task list and the worker's log show this instead of the bare ids.
            argsrepr=f"{queue} job {job_id[:8]} chunk {chunk_no}",
            retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5},
        )
