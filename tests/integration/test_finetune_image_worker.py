"""Image fine-tuning through a real Celery worker: an S3 base pipeline and an S3 dataset prefix, the
worker killed mid-run, a second one resuming from the checkpoint and registering the version once."""

from __future__ import annotations

import time

import pytest

from aigc_core.registry import dir_digest
from aigc_core.schema import JobStatus
from scheduler import Client
from tests.support.images import write_image_folder
from tests.support.models import build_tiny_sd

pytestmark = pytest.mark.integration


def _upload(s3_server, bucket: str, folder, prefix: str) -> str:
    c = s3_server.client()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            c.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(folder).as_posix()}")
    return f"s3://{bucket}/{prefix}/"


def test_a_killed_image_training_worker_resumes_from_its_checkpoint_and_registers_once(
        deploy_client, deploy_settings, workers, s3_server, s3_bucket, tmp_path):
    c = deploy_client
    sd = build_tiny_sd(tmp_path / "tiny-sd")
    c.register_model("tiny-sd", "image", _upload(s3_server, s3_bucket, sd, "models/tiny-sd/1"),
                     digest=dir_digest(sd), defaults={"num_inference_steps": 5})
    data = _upload(s3_server, s3_bucket, write_image_folder(tmp_path / "style", 8), "data/style")
    hp = {"max_steps": 80, "learning_rate": 1e-2, "batch_size": 2, "eval_every": 10, "checkpoint_every": 10,
          "rank": 4}
    env = {"AIGC_LEASE_S": "4", "AIGC_TORCH_THREADS": "1"}  # tiny models crawl on a busy machine's threads
    w1 = workers(queues="train,image", pool="solo", env=env)
    ft = c.finetune("tiny-sd", data, "house-style", hp)
    assert ft.status in (JobStatus.queued, JobStatus.running)  # the started worker may have claimed it already
    gen = c.submit("image", model="house-style", items=["red square"], after=ft.id)

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill once a checkpoint is safely in the store
        if any(e["type"] == "checkpoint" and e["name"] >= "step-00000020" for e in c.events(ft.id)):
            break
        time.sleep(0.05)
    w1.kill()
    steps_before = max(e["step"] for e in c.events(ft.id) if e["type"] == "train")
    assert steps_before < 80, "training finished before the kill; make it longer"

    workers(queues="train,image", pool="solo", env=env)
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
    versions = [m for m in c.models() if m["name"] == "house-style"]
    assert len(versions) == 1 and versions[0]["lineage"]["metrics"]["steps"] == 80
    metrics = versions[0]["lineage"]["metrics"]
    assert metrics["eval_loss"] < metrics["eval_loss_before"]
    assert versions[0]["lineage"]["dataset"] == data
    (out,) = list(c.results(gen.id))
    assert out.provenance["model"]["weights_digest"] == versions[0]["digest"]
