"""Send chunk messages by task name: the scheduler never imports the worker or torch."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
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
            TASK, args=[job_id, chunk_no], queue=queue, retry=True, argsrepr=_label(queue, job_id, chunk_no),
            retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5},
        )

    def many(self, chunks: Sequence[tuple[str, str, int]]) -> None:
        """Send (queue, job_id, chunk_no) messages through one Redis pipeline (kombu's producer batch):
        one round trip for the lot instead of one each. Each message is built by Celery's own
        ``as_task_v2`` and sent by its ``send_task_message`` with what ``send_task`` would pass, so it
        is byte for byte the message ``__call__`` sends (tests/integration/test_publish_many.py); only
        ``send_task``'s per-call routing and option merging, a third of a message's cost, is skipped.
        If the pipeline fails (a connection Redis closed since it was pooled), the group is sent again
        one message at a time with ``__call__``'s retry; what still fails raises, and the caller leaves
        those chunks in the outbox. A message sent twice is harmless: a redelivered chunk claims nothing."""
        app = self.app
        amqp = app.amqp
        try:
            with app.producer_or_acquire() as producer, producer.batch(max_size=len(chunks) + 1):
                for queue, job_id, chunk_no in chunks:
                    label = _label(queue, job_id, chunk_no)
                    message = amqp.as_task_v2(str(uuid.uuid4()), TASK, args=[job_id, chunk_no], argsrepr=label,
                                              reply_to=app.thread_oid, ignore_result=None)
                    amqp.send_task_message(producer, TASK, message, queue=queue, retry=False, argsrepr=label)
        except Exception:
            for queue, job_id, chunk_no in chunks:
                self(queue, job_id, chunk_no)


def _label(queue: str, job_id: str, chunk_no: int) -> str:
    """Flower's task list and the worker's log show this instead of the bare ids."""
    return f"{queue} job {job_id[:8]} chunk {chunk_no}"
