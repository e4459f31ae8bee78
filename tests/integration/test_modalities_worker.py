"""Text, image and audio jobs through one real Celery worker, to S3 and PostgreSQL."""

from __future__ import annotations

import io
import json

import pytest
import soundfile as sf
from PIL import Image

from aigc_core.schema import JobStatus

pytestmark = pytest.mark.integration


def test_write_draw_and_narrate_through_a_celery_worker(deploy_client, workers):
    c = deploy_client
    workers(queues="text,image,audio", pool="solo", env={"AIGC_TORCH_THREADS": "1"})
    text = c.submit("text", model="tiny", items=[{"custom_id": f"a{i}", "prompt": f"Headline: {i}\n\n"}
                                                 for i in range(3)], params={"echo": True})
    talk = c.submit("audio", model="espeak-en", items=[{"custom_id": f"read-a{i}",
                                                        "from": {"job": text.id, "custom_id": f"a{i}"}}
                                                       for i in range(3)])
    draw = c.submit("image", model="demo-digits", items=[{"custom_id": f"d{d}", "params": {"digit": d}}
                                                         for d in range(4)])
    assert talk.status == JobStatus.waiting
    for job in (text, draw, talk):
        assert c.wait(job.id, timeout=180, poll_s=0.2).status == JobStatus.succeeded, c.status(job.id)
    for r in c.results(draw.id):
        img = Image.open(io.BytesIO(c.store.get(r.key)))
        assert json.loads(img.text["aigc:provenance"])["job_id"] == draw.id
        assert r.uri.startswith("s3://") and r.uri.endswith(".png")
    for r in c.results(talk.id):
        _samples, rate = sf.read(io.BytesIO(c.store.get(r.key)))
        assert rate == 22050 and r.duration_s > 0.2 and r.provenance["source"]["job"] == text.id
    # A released job started without waiting for the reconciler: the worker that finished
    # the text job published the narration's chunks itself.
    assert any(e["type"] == "released" for e in c.events(talk.id))
