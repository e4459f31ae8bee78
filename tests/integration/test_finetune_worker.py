"""Fine-tuning through a real Celery worker on the ``train`` queue, killed mid-run and resumed."""

from __future__ import annotations

import json
import time

import pytest

from aigc_core.schema import JobStatus
from scheduler import Client
from tests.support.models import corpus_texts

pytestmark = pytest.mark.integration


def test_a_killed_training_worker_resumes_from_its_checkpoint_and_registers_once(
        deploy_client, deploy_settings, workers, tmp_path):
    c = deploy_client
    data = tmp_path / "house.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts()))
    hp = {"epochs": 100, "max_steps": 100, "learning_rate": 3e-3, "batch_size": 4, "block_size": 64,
          "eval_every": 5, "checkpoint_every": 20, "patience": 0}
    env = {"AIGC_LEASE_S": "4"}
    w1 = workers(queues="train,text", pool="solo", env=env)
    ft = c.finetune("tiny", data, "house-news", hp)
    assert ft.status in (JobStatus.queued, JobStatus.running)  # the started worker may have claimed it already
    gen = c.submit("text", model="house-news", items=["Headline: Trained\n\n"], after=ft.id)

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill once a checkpoint is safely in the store
        if any(e["type"] == "checkpoint" and e["name"] >= "step-00000020" for e in c.events(ft.id)):
            break
        time.sleep(0.05)
    w1.kill()
    steps_before = max(e["step"] for e in c.events(ft.id) if e["type"] == "train")
    assert steps_before < 100, "training finished before the kill; make it longer"

    workers(queues="train,text", pool="solo", env=env)
    lease_client = Client(deploy_settings.model_copy(update={"republish_after_s": 5}))
    deadline = time.monotonic() + 240
    while not (view := c.status(gen.id)).final and time.monotonic() < deadline:
        lease_client.reconcile()
        time.sleep(0.5)
    assert c.status(ft.id).status == JobStatus.succeeded, c.events(ft.id)[-5:]
    assert view.status == JobStatus.succeeded

    events = c.events(ft.id)
    (resumed,) = [e for e in events if e["type"] == "resumed"]
    start = int(resumed["checkpoint"].removeprefix("step-"))
    assert start >= 20
    after = [e["step"] for e in events[events.index(resumed):] if e["type"] == "train"]
    assert after and min(after) > start  # continued from the checkpoint, not from step 0
    versions = [m for m in c.models() if m["name"] == "house-news"]
    assert len(versions) == 1 and versions[0]["lineage"]["metrics"]["steps"] == 100
    metrics = versions[0]["lineage"]["metrics"]
    assert metrics["eval_loss"] < metrics["eval_loss_before"]  # held-out loss fell across the resume
    (out,) = list(c.results(gen.id))
    assert out.provenance["model"]["name"] == "house-news"
    assert out.provenance["model"]["weights_digest"] == versions[0]["digest"]
