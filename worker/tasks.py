"""Thin Celery tasks: unpack ids, call the pipeline."""

from __future__ import annotations

from aigc_core.errors import TransientError
from worker import pipeline
from worker.app import app
from worker.runtime import get_runtime


@app.task(
    name="worker.run_chunk", bind=True, acks_late=True, autoretry_for=(TransientError,),
    retry_backoff=2, retry_backoff_max=60, retry_jitter=True, max_retries=8,
)
def run_chunk(self, job_id: str, chunk_no: int) -> dict:
    rt = get_runtime()
    rt.publish = _publish
    return pipeline.run_chunk(rt, job_id, int(chunk_no)).as_dict()


def _publish(queue: str, job_id: str, chunk_no: int) -> None:
    app.send_task("worker.run_chunk", args=[job_id, chunk_no], queue=queue)
