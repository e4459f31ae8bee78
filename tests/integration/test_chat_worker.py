"""A chat job through Redis and a real Celery worker, its ChatML checkpoint fetched from S3, its
outputs in S3 and PostgreSQL: each reply ends at <|im_end|>, a listed EOS the tokenizer does not call
its own."""

from __future__ import annotations

import hashlib

import pytest

from aigc_core.registry import dir_digest
from aigc_core.schema import JobStatus
from tests.support.chat_models import CHATML, CHECKPOINT_SAMPLING, build_chat_model

pytestmark = pytest.mark.integration


@pytest.fixture
def chat_model_on_s3(tmp_path, s3_bucket, s3_server) -> tuple[str, str]:
    path = build_chat_model(tmp_path / "chatml")
    c = s3_server.client()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            c.upload_file(str(p), s3_bucket, f"models/chat/1/{p.relative_to(path).as_posix()}")
    return f"s3://{s3_bucket}/models/chat/1/", dir_digest(path)


def test_a_chat_job_through_a_celery_worker_ends_each_reply_at_the_end_of_turn_token(
        deploy_client, workers, chat_model_on_s3):
    c = deploy_client
    uri, digest = chat_model_on_s3
    c.register_model("chat", "text", uri, digest=digest)
    workers(pool="solo")
    items = [{"custom_id": f"h{i}", "messages": [{"role": "user", "content": f"Council story {i}"}]}
             for i in range(6)]
    job = c.submit("text", model="chat", items=items, system="You write one-line headlines.",
                   params={"max_new_tokens": 60}, seed=11)
    view = c.wait(job.id, timeout=180, poll_s=0.2)
    assert view.status == JobStatus.succeeded, view.counts
    for r in c.results(job.id):
        p = r.provenance
        assert r.uri.startswith("s3://") and p["model"]["weights_digest"] == digest
        assert p["output"]["finish_reason"] == "stop" and p["output"]["new_tokens"] < 60
        assert {k: p["params"][k] for k in CHECKPOINT_SAMPLING} == CHECKPOINT_SAMPLING
        assert {p["param_sources"][k] for k in CHECKPOINT_SAMPLING} == {"checkpoint"}
        assert p["param_sources"]["max_new_tokens"] == "job"
        rendered = (f"<|im_start|>system\nYou write one-line headlines.<|im_end|>\n<|im_start|>user\n"
                    f"Council story {r.index}<|im_end|>\n<|im_start|>assistant\n")
        assert p["prompt_sha256"] == hashlib.sha256(rendered.encode()).hexdigest()
        assert p["chat_template_sha256"] == hashlib.sha256(CHATML.encode()).hexdigest()
        text = c.store.get(r.key).decode()
        assert "<|im_end|>" not in text and "<|endoftext|>" not in text
