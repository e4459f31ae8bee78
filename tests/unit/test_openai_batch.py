"""OpenAI Batch files without a server (``Client.submit_openai_batch``, ``aigc submit --openai-batch``),
image and speech requests, and the same output file from the client as from ``aigc serve``'s app, on an
embedded SQLite database with the in-process worker."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
from PIL import Image

from aigc_core.errors import SpecError
from aigc_core.schema import JobStatus
from scheduler.openai_batch import IMAGES, SPEECH, parse_requests
from tests.support.models import build_tiny_ddim

AIGC = str(Path(sys.executable).parent / "aigc")


def jsonl(*lines: dict) -> bytes:
    return "".join(json.dumps(x) + "\n" for x in lines).encode()


def req(cid: str, url: str, **body) -> dict:
    return {"custom_id": cid, "method": "POST", "url": url, "body": {"model": "m", **body}}


@pytest.fixture
def mclient(client, sqlite_settings):
    """The embedded client (``tiny`` text model registered), on one torch thread."""
    from scheduler import Client

    return Client(sqlite_settings.model_copy(update={"torch_threads": 1}))


def test_image_and_speech_requests_map_onto_items_with_one_response_format():
    p = parse_requests(jsonl(req("a", IMAGES, prompt="a cat", size="32x16", seed=4, n=1),
                             req("b", IMAGES, prompt="a dog", response_format="url")), IMAGES, {"m": "diffusers"}, 9)
    assert p.errors == [] and p.seed == 4 and p.response_format == "url"
    assert p.items == [{"custom_id": "a", "prompt": "a cat", "params": {"width": 32, "height": 16}},
                       {"custom_id": "b", "prompt": "a dog", "params": {}}]
    digits = parse_requests(jsonl(req("a", IMAGES, prompt="7", size="64x64")), IMAGES, {"m": "digits"}, 9)
    assert digits.items[0]["params"] == {"size": 64}
    s = parse_requests(jsonl(req("a", SPEECH, input="Hello.", voice="en-us", response_format="b64_json")),
                       SPEECH, {"m": "espeak"}, 9)
    assert s.errors == [] and s.response_format == "b64_json"
    assert s.items == [{"custom_id": "a", "text": "Hello.", "params": {"voice": "en-us"}}]
    vits = parse_requests(jsonl(req("a", SPEECH, input="Hi", voice="2")), SPEECH, {"m": "hf-tts"}, 9)
    assert vits.items[0]["params"] == {"speaker_id": 2}


def test_image_and_speech_refusals_carry_their_lines():
    p = parse_requests(jsonl(req("a", IMAGES, prompt="x", n=2), req("b", IMAGES, prompt="x", size="big"),
                             req("c", IMAGES, prompt="x", response_format="b64_json"),
                             req("d", IMAGES, prompt="x", quality="hd")), IMAGES, {"m": "diffusers"}, 9)
    assert [(e["line"], e["code"], e["param"]) for e in p.errors] == [
        (1, "unsupported_value", "body.n"), (2, "invalid_value", "body.size"),
        (3, "mismatched_response_format", "body.response_format"), (4, "unsupported_parameter", "body.quality")]
    s = parse_requests(jsonl(req("a", SPEECH, input=""), req("b", SPEECH, input="x", voice="alloy"),
                             req("c", SPEECH, input="x", response_format="mp3")), SPEECH, {"m": "hf-tts"}, 9)
    assert [(e["line"], e["param"]) for e in s.errors] == [
        (1, "body.input"), (2, "body.voice"), (3, "body.response_format")]


def test_speech_batch_through_the_client_names_the_stored_wavs(mclient, tmp_path):
    lines = [req(f"s{i}", SPEECH, model="espeak-en", input=f"Item number {i}.", voice="en-us") for i in range(2)]
    job = mclient.submit_openai_batch(lines)
    assert job.kind == "audio" and mclient.wait(job.id, timeout=120).status == JobStatus.succeeded
    ok, bad = mclient.openai_batch_output(job.id, tmp_path / "out.jsonl")
    assert (ok, bad) == (2, 0) and not (tmp_path / "out.errors.jsonl").exists()
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [x["custom_id"] for x in out] == ["s0", "s1"]
    for x, r in zip(out, mclient.results(job.id), strict=True):
        body = x["response"]["body"]
        assert body["object"] == "audio.speech" and body["model"] == "espeak-en"
        assert (body["url"], body["sha256"], body["media_type"]) == (r.uri, r.sha256, "audio/wav")
        assert body["duration_s"] > 0 and "b64_json" not in body


def test_b64_json_puts_the_stored_bytes_in_the_line(mclient, tmp_path):
    mclient.register_model("tiny-ddim", "image", build_tiny_ddim(tmp_path / "ddim").as_uri(),
                           defaults={"num_inference_steps": 2})
    job = mclient.submit_openai_batch(jsonl(
        *(req(f"i{i}", IMAGES, model="tiny-ddim", prompt="noise", size="16x16", seed=5,
              response_format="b64_json") for i in range(2))))
    assert mclient.wait(job.id, timeout=120).status == JobStatus.succeeded
    mclient.openai_batch_output(job.id, tmp_path / "img.jsonl")
    out = [json.loads(x) for x in (tmp_path / "img.jsonl").read_text().splitlines()]
    for x in out:
        (data,) = x["response"]["body"]["data"]
        raw = base64.b64decode(data["b64_json"])
        assert hashlib.sha256(raw).hexdigest() == data["sha256"] and data["media_type"] == "image/png"
        assert Image.open(io.BytesIO(raw)).size == (16, 16) and "url" not in data
    speech = mclient.submit_openai_batch([req("w", SPEECH, model="espeak-en", input="Hi.",
                                              response_format="b64_json")])
    mclient.wait(speech.id, timeout=120)
    mclient.openai_batch_output(speech.id, tmp_path / "wav.jsonl")
    body = json.loads((tmp_path / "wav.jsonl").read_text())["response"]["body"]
    assert sf.info(io.BytesIO(base64.b64decode(body["b64_json"]))).samplerate == 22050


def test_client_and_server_write_the_same_output_file(mclient, sqlite_settings, tmp_path):
    from fastapi.testclient import TestClient

    from scheduler.api import create_app

    lines = [req(f"r{i}", "/v1/completions", model="tiny", prompt=f"Headline: story {i}", max_tokens=5, seed=3)
             for i in range(3)]
    job = mclient.submit_openai_batch(lines, metadata={"run": "a"})
    mclient.wait(job.id, timeout=120)
    mclient.openai_batch_output(job.id, tmp_path / "client.jsonl")
    with TestClient(create_app(sqlite_settings, auth=False)) as http:
        f = http.post("/v1/files", files={"file": ("r.jsonl", jsonl(*lines))}, data={"purpose": "batch"}).json()
        b = http.post("/v1/batches", json={"input_file_id": f["id"], "endpoint": "/v1/completions",
                                           "completion_window": "24h"}).json()
        assert b["status"] == "in_progress", b
        mclient.wait(mclient.jobs(1)[0].id, timeout=120)  # embedded: the job runs here
        done = http.get(f"/v1/batches/{b['id']}").json()
        served = http.get(f"/v1/files/{done['output_file_id']}/content").text
    ours = [json.loads(x) for x in (tmp_path / "client.jsonl").read_text().splitlines()]
    theirs = [json.loads(x) for x in served.splitlines()]

    def shape(x: dict) -> dict:  # ids, times and job ids differ; everything else is the same
        body = {k: v for k, v in x["response"]["body"].items() if k not in ("id", "created")}
        return {"custom_id": x["custom_id"], "status": x["response"]["status_code"], "body": body,
                "error": x["error"], "keys": sorted(x), "response_keys": sorted(x["response"])}

    assert [shape(x) for x in ours] == [shape(x) for x in theirs] and len(ours) == 3
    assert ours[0]["response"]["body"]["choices"][0]["text"]


def test_a_refused_file_names_its_line_and_writes_nothing(mclient):
    before = len(mclient.jobs())
    with pytest.raises(SpecError, match=r"input line 2: .*not a registered text model"):
        mclient.submit_openai_batch([req("a", "/v1/completions", model="tiny", prompt="x"),
                                     req("b", "/v1/completions", model="nope", prompt="x")])
    with pytest.raises(SpecError, match="not submitted from an OpenAI batch file"):
        mclient.openai_batch_output(mclient.submit("text", "tiny", ["x"]).id, "/nonexistent/out.jsonl")
    assert len(mclient.jobs()) == before + 1


def test_aigc_submit_openai_batch_waits_and_writes_the_output_file(sqlite_settings, client, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIGC_")}
    env.update(AIGC_DATABASE_URL=sqlite_settings.database_url, AIGC_STORAGE_URL=sqlite_settings.storage_url,
               AIGC_CACHE_DIR=str(tmp_path / "cache"), AIGC_TORCH_THREADS="1")
    good = tmp_path / "requests.jsonl"
    good.write_bytes(jsonl(*(req(f"s{i}", SPEECH, model="espeak-en", input=f"Line {i}.") for i in range(2))))
    run = subprocess.run([AIGC, "submit", "--openai-batch", str(good), "--output", str(tmp_path / "res.jsonl")],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    out = [json.loads(x) for x in (tmp_path / "res.jsonl").read_text().splitlines()]
    assert [x["custom_id"] for x in out] == ["s0", "s1"] and all(x["error"] is None for x in out)
    assert "output: 2 lines" in run.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(jsonl(req("a", SPEECH, model="espeak-en", input="x"), req("a", SPEECH, model="espeak-en",
                                                                              input="y")))
    refused = subprocess.run([AIGC, "submit", "--openai-batch", str(bad)], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "line 2" in refused.stderr and "duplicate_custom_id" in refused.stderr


def test_a_speech_batch_through_the_api_names_its_wavs(mclient, sqlite_settings):
    from fastapi.testclient import TestClient

    from scheduler.api import create_app

    lines = [req(f"s{i}", SPEECH, model="espeak-en", input=f"Number {i}.", voice="en-us") for i in range(2)]
    with TestClient(create_app(sqlite_settings, auth=False)) as http:
        bad = http.post("/v1/files", files={"file": ("b.jsonl", jsonl(req("x", SPEECH, model="tiny", input="x")))},
                        data={"purpose": "batch"}).json()
        refused = http.post("/v1/batches", json={"input_file_id": bad["id"], "endpoint": SPEECH}).json()
        assert refused["status"] == "failed" and refused["errors"]["data"][0]["code"] == "model_not_found"
        f = http.post("/v1/files", files={"file": ("r.jsonl", jsonl(*lines))}, data={"purpose": "batch"}).json()
        b = http.post("/v1/batches", json={"input_file_id": f["id"], "endpoint": SPEECH}).json()
        assert b["status"] == "in_progress" and b["request_counts"]["total"] == 2, b
        mclient.wait(mclient.jobs(1)[0].id, timeout=120)
        done = http.get(f"/v1/batches/{b['id']}").json()
        assert done["status"] == "completed" and done["model"] == "espeak-en"
        out = [json.loads(x) for x in http.get(f"/v1/files/{done['output_file_id']}/content").text.splitlines()]
    recorded = {r.custom_id: r for r in mclient.results(mclient.jobs(1)[0].id)}
    assert sorted(x["custom_id"] for x in out) == ["s0", "s1"]
    for x in out:
        body, r = x["response"]["body"], recorded[x["custom_id"]]
        assert (body["url"], body["sha256"], body["media_type"]) == (r.uri, r.sha256, "audio/wav")


def test_the_batch_format_and_the_submit_command_load_neither_fastapi_nor_torch():
    code = ("import sys; import scheduler.cli.root, scheduler.cli.keys, scheduler.openai_batch; "
            "from scheduler import Client; "
            "bad = [m for m in ('fastapi', 'starlette', 'uvicorn', 'torch') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
