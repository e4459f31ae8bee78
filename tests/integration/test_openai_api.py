"""The OpenAI-compatible Batch API, driven by the official openai SDK against a real ``aigc serve``
(uvicorn) on a free loopback port, with a real Celery worker, PostgreSQL, Redis and S3."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest
from openai import OpenAI
from sqlalchemy import func, select

from aigc_core.schema import Job
from scheduler.api.keys import create_key
from tests.support.workers import ServiceProc

pytestmark = pytest.mark.integration

UPLOAD_CAP = 64 * 1024
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(env: dict[str, str], log: Path) -> tuple[ServiceProc, str]:
    """``aigc serve`` in a process of its own, as a deployment runs it, on a free loopback port."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "scheduler.cli", "serve", "--port", str(port)],
                            stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
                            cwd=ROOT)
    server = ServiceProc(proc, log)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{base}/healthz", timeout=1).read()
            return server, base
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"aigc serve did not start:\n{server.log()[-3000:]}") from None
            time.sleep(0.1)


@pytest.fixture
def server_env(deploy_env) -> dict[str, str]:
    return {**os.environ, **deploy_env, "AIGC_API_MAX_FILE_BYTES": str(UPLOAD_CAP), "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def api_server(server_env, deploy_client, tmp_path):
    key = create_key(deploy_client.db, f"first-{time.monotonic_ns()}")  # serve wants an active key
    server, base = start_server(server_env, tmp_path / "serve.log")
    yield base, key
    server.stop()


@pytest.fixture
def chat_model(deploy_client, s3_bucket, s3_server, tmp_path) -> str:
    """The tiny ChatML checkpoint (tests/support/chat_models.py) in S3, registered as ``tiny-chat``."""
    from aigc_core.registry import dir_digest
    from tests.support.chat_models import build_chat_model

    path = build_chat_model(tmp_path / "chat")
    c = s3_server.client()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            c.upload_file(str(p), s3_bucket, f"models/tiny-chat/1/{p.relative_to(path).as_posix()}")
    deploy_client.register_model("tiny-chat", "text", f"s3://{s3_bucket}/models/tiny-chat/1/",
                                 digest=dir_digest(path))
    return "tiny-chat"


def sdk(base: str, key: str) -> OpenAI:
    return OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, _strict_response_validation=True)


def requests_file(n: int, *, model: str = "tiny") -> bytes:
    lines = [{"custom_id": f"req-{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": model, "prompt": f"Headline: story {i}", "max_tokens": 6, "seed": 7}}
             for i in range(n)]
    return "".join(json.dumps(x) + "\n" for x in lines).encode()


def wait_final(client: OpenAI, batch_id: str, timeout: float = 180.0):
    deadline = time.monotonic() + timeout
    while True:
        b = client.batches.retrieve(batch_id)
        if b.status in ("completed", "failed", "cancelled", "expired"):
            return b
        assert time.monotonic() < deadline, f"batch still {b.status}: {b.request_counts}"
        time.sleep(0.3)


def test_sdk_batch_runs_and_its_output_file_has_every_request(api_server, deploy_client, chat_model, workers):
    base, key = api_server
    client = sdk(base, key)
    chat = [{"custom_id": f"chat-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": chat_model, "max_completion_tokens": 8, "seed": 3,
                      "messages": [{"role": "developer", "content": "Be brief."},
                                   {"role": "user", "content": [{"type": "text", "text": f"Story {i}?"}]}]}}
            for i in range(3)]
    chat_file = client.files.create(file=("chat.jsonl", "".join(json.dumps(x) + "\n" for x in chat).encode()),
                                    purpose="batch")
    chat_batch = client.batches.create(input_file_id=chat_file.id, endpoint="/v1/chat/completions",
                                       completion_window="24h")
    assert chat_batch.status == "in_progress", chat_batch.errors
    workers()
    assert "tiny" in [m.id for m in client.models.list()]
    f = client.files.create(file=("requests.jsonl", requests_file(5)), purpose="batch")
    assert f.bytes == len(requests_file(5)) and f.purpose == "batch"
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h",
                                  metadata={"run": "nightly"})
    assert batch.status == "in_progress" and batch.request_counts and batch.request_counts.total == 5
    done = wait_final(client, batch.id)
    assert done.status == "completed", done
    assert done.request_counts and (done.request_counts.completed, done.request_counts.failed) == (5, 0)
    assert done.output_file_id and done.error_file_id is None and done.completed_at and done.in_progress_at
    lines = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    print("\n".join(json.dumps(x) for x in lines[:2]))
    assert sorted(x["custom_id"] for x in lines) == [f"req-{i}" for i in range(5)]
    job_id = deploy_client.jobs(1)[0].id
    recorded = {r.custom_id: r.provenance["output"] for r in deploy_client.results(job_id)}
    for x in lines:
        assert x["error"] is None and x["response"]["status_code"] == 200
        body = x["response"]["body"]
        assert body["object"] == "text_completion" and body["choices"][0]["text"].strip()
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
        rec = recorded[x["custom_id"]]
        assert body["usage"]["prompt_tokens"] == rec["prompt_tokens"] > 0
        assert body["usage"]["completion_tokens"] == rec["new_tokens"] > 0
    page = client.batches.list(limit=1)
    assert [b.id for b in page.data] == [batch.id] and page.has_more
    assert [b.id for b in client.batches.list(limit=1, after=batch.id).data] == [chat_batch.id]
    chat_done = wait_final(client, chat_batch.id)
    assert chat_done.status == "completed" and chat_done.output_file_id, chat_done
    chat_lines = [json.loads(x) for x in client.files.content(chat_done.output_file_id).text.splitlines()]
    print("\n".join(json.dumps(x) for x in chat_lines[:2]))
    assert sorted(x["custom_id"] for x in chat_lines) == [f"chat-{i}" for i in range(3)]
    for x in chat_lines:
        body = x["response"]["body"]
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
        assert body["choices"][0]["finish_reason"] in ("stop", "length") and body["usage"]["prompt_tokens"] > 0
    assert client.files.retrieve(done.output_file_id).purpose == "batch_output"


def test_a_server_killed_mid_batch_loses_nothing(server_env, deploy_client, workers, tmp_path):
    key = create_key(deploy_client.db, f"restart-{time.monotonic_ns()}")
    server, base = start_server(server_env, tmp_path / "serve1.log")
    client = sdk(base, key)
    f = client.files.create(file=("r.jsonl", requests_file(4)), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    server.kill()  # SIGKILL, mid-batch: nothing has run yet
    workers()
    job_id = deploy_client.jobs(1)[0].id
    deploy_client.wait(job_id, timeout=120)  # the workers finish the job with no server up
    server, base = start_server(server_env, tmp_path / "serve2.log")
    try:
        done = wait_final(sdk(base, key), batch.id, timeout=30)
        assert done.status == "completed" and done.request_counts and done.request_counts.completed == 4
        assert done.output_file_id
        lines = sdk(base, key).files.content(done.output_file_id).text.splitlines()
        assert sorted(json.loads(x)["custom_id"] for x in lines) == [f"req-{i}" for i in range(4)]
    finally:
        server.stop()


def test_another_key_gets_404_on_the_first_keys_batch_and_file(api_server, deploy_client):
    base, key = api_server
    first = sdk(base, key)
    other = sdk(base, create_key(deploy_client.db, f"other-{time.monotonic_ns()}"))
    f = first.files.create(file=("r.jsonl", requests_file(2)), purpose="batch")
    batch = first.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    for call in (lambda: other.batches.retrieve(batch.id), lambda: other.files.retrieve(f.id),
                 lambda: other.files.content(f.id), lambda: other.batches.cancel(batch.id),
                 lambda: other.batches.create(input_file_id=f.id, endpoint="/v1/completions",
                                              completion_window="24h")):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert e.value.response.json()["error"]["code"] == "not_found"
    assert batch.id not in [b.id for b in other.batches.list().data]
    with pytest.raises(openai.AuthenticationError):
        sdk(base, "sk-aigc-not-a-key").files.list()


def test_cancel_ends_cancelled_with_the_requests_in_the_error_file(api_server):
    base, key = api_server
    client = sdk(base, key)  # no worker: the requests are still pending when the cancel comes
    f = client.files.create(file=("r.jsonl", requests_file(3)), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled") and cancelled.cancelling_at
    done = wait_final(client, batch.id, timeout=30)
    assert done.status == "cancelled" and done.cancelled_at and done.output_file_id is None
    assert done.error_file_id
    errors = [json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()]
    assert sorted(e["custom_id"] for e in errors) == ["req-0", "req-1", "req-2"]
    assert {(e["response"], e["error"]["code"]) for e in errors} == {(None, "batch_cancelled")}


def test_malformed_file_fails_with_line_numbers_and_enqueues_nothing(api_server, deploy_client):
    base, key = api_server
    client = sdk(base, key)
    good = json.loads(requests_file(1).decode())
    lines = [json.dumps(good), "{not json", json.dumps({**good, "url": "/v1/embeddings"}),
             json.dumps(good),  # the same custom_id again
             json.dumps({**good, "custom_id": "x", "body": {**good["body"], "model": "no-such-model"}})]
    f = client.files.create(file=("bad.jsonl", ("\n".join(lines) + "\n").encode()), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    assert batch.status == "failed" and batch.failed_at and batch.errors and batch.errors.data
    by_line = {e.line: e.code for e in batch.errors.data}
    assert by_line == {2: "invalid_json_line", 3: "mismatched_url", 4: "duplicate_custom_id",
                       5: "model_not_found"}
    with deploy_client.db.session() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 0


def test_upload_over_the_cap_is_refused_with_413_in_openais_shape(api_server):
    base, key = api_server
    client = sdk(base, key)
    with pytest.raises(openai.APIStatusError) as e:
        client.files.create(file=("big.jsonl", b"x" * (100 * 1024 * 1024)), purpose="batch")  # 100 MB
    assert e.value.status_code == 413
    err = e.value.response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == "file_too_large"
    assert client.files.list().data == [] or all(x.filename != "big.jsonl" for x in client.files.list().data)


SLOW = {"AIGC_BACKENDS": "slow=tests.support.slow_backend:SlowGenerator", "AIGC_MICRO_BATCH_SIZE": "2",
        "AIGC_TEST_SLOW_S": "0.5"}


def test_cancel_mid_run_keeps_finished_outputs_and_lists_the_rest_as_cancelled(api_server, deploy_client,
                                                                               workers, tmp_path):
    """A worker runs a batch of 16 (chunks of 8, micro-batches of 2 that take a second each); the cancel
    comes once the first requests are done: ``cancelling`` while a micro-batch runs, then
    ``cancelled``, with the finished requests in the output file and the others in the error file."""
    base, key = api_server
    model_dir = tmp_path / "slow-model"
    model_dir.mkdir()
    deploy_client.register_model("slow", "text", model_dir.as_uri(), backend="slow")
    workers(env=SLOW)
    client = sdk(base, key)
    f = client.files.create(file=("r.jsonl", requests_file(16, model="slow")), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    deadline = time.monotonic() + 60
    while (b := client.batches.retrieve(batch.id)).request_counts and b.request_counts.completed < 1:
        assert time.monotonic() < deadline and b.status == "in_progress", b
        time.sleep(0.05)
    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status == "cancelling" and cancelled.cancelling_at and cancelled.cancelled_at is None
    done = wait_final(client, batch.id, timeout=60)
    assert done.status == "cancelled" and done.cancelled_at and done.output_file_id and done.error_file_id
    assert done.request_counts is not None
    out = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    errors = [json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()]
    finished = {x["custom_id"] for x in out}
    assert 1 <= len(out) == done.request_counts.completed < 16
    assert all(x["error"] is None and x["response"]["status_code"] == 200 for x in out)
    assert finished | {e["custom_id"] for e in errors} == {f"req-{i}" for i in range(16)}
    assert not finished & {e["custom_id"] for e in errors}
    assert {(e["response"], e["error"]["code"]) for e in errors} == {(None, "batch_cancelled")}


def test_speech_batch_through_the_sdk_returns_the_wavs_bytes_or_their_names(api_server, deploy_client, workers):
    """/v1/audio/speech on the built-in espeak-en model, run by a Celery worker on the audio queue: with
    response_format b64_json the line carries the WAV itself; its sha256 is the stored object's."""
    import base64
    import hashlib

    base, key = api_server
    workers(queues="audio")
    client = sdk(base, key)
    lines = [{"custom_id": f"say-{i}", "method": "POST", "url": "/v1/audio/speech",
              "body": {"model": "espeak-en", "input": f"Bulletin number {i}.", "voice": "en-us",
                       "response_format": "b64_json"}} for i in range(2)]
    f = client.files.create(file=("speech.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode()),
                            purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/audio/speech",  # type: ignore[arg-type]
                                  completion_window="24h")
    assert batch.status == "in_progress", batch.errors
    done = wait_final(client, batch.id)
    assert done.status == "completed" and done.output_file_id, done
    out = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    stored = {r.custom_id: r for r in deploy_client.results(deploy_client.jobs(1)[0].id)}
    assert sorted(x["custom_id"] for x in out) == ["say-0", "say-1"]
    for x in out:
        body = x["response"]["body"]
        wav = base64.b64decode(body["b64_json"])
        assert wav[:4] == b"RIFF" and hashlib.sha256(wav).hexdigest() == body["sha256"]
        assert body["sha256"] == stored[x["custom_id"]].sha256 and body["media_type"] == "audio/wav"
