"""Messages are JSON only: a pickled message is refused by a real worker and runs nothing."""

from __future__ import annotations

import time

import pytest
from celery import Celery

from aigc_core.schema import JobStatus

pytestmark = pytest.mark.integration


def test_a_pickled_message_is_refused_and_runs_nothing(deploy_client, deploy_env, workers):
    from unittest import mock

    c = deploy_client
    with mock.patch.object(type(c), "_publish_job", lambda self, job_id: None):  # keep it in the outbox
        job = c.submit("text", model="tiny", items=["Headline: x\n\n"])
    evil = Celery("evil", broker=deploy_env["AIGC_BROKER_URL"])
    evil.conf.update(task_serializer="pickle", accept_content=["pickle", "json"])
    evil.send_task("worker.run_chunk", args=[job.id, 0], queue="text", serializer="pickle")
    w = workers(pool="solo")
    deadline = time.monotonic() + 30
    while "pickle" not in w.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "Refusing to deserialize untrusted content of type pickle" in w.log()
    time.sleep(1)
    view = c.status(job.id)
    assert view.status == JobStatus.queued and view.counts["pending"] == 1  # nothing ran
