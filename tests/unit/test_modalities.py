"""Image and audio jobs through the same client, pipeline and provenance as text."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from aigc_core.errors import SpecError
from aigc_core.schema import ItemStatus, JobStatus
from aigc_models.digits import classify
from aigc_models.media import read_wav_metadata
from tests.support.models import build_tiny_ddim, build_tiny_vits


@pytest.fixture
def mclient(client, sqlite_settings):
    """The embedded client, on one torch thread (tiny models crawl on several here)."""
    from scheduler import Client

    return Client(sqlite_settings.model_copy(update={"torch_threads": 1}))


def test_built_in_models_are_registered_on_a_fresh_database(mclient):
    names = {m["name"]: m for m in mclient.models()}
    assert names["espeak-en"]["kind"] == "audio" and names["espeak-en"]["uri"] == "builtin://espeak-en"
    assert names["demo-digits"]["kind"] == "image" and names["demo-digits"]["backend"] == "digits"


def test_digits_come_out_as_pngs_carrying_their_provenance_and_recognisable(mclient):
    items = [{"custom_id": f"d{d}", "params": {"digit": d}} for d in range(10)]
    job = mclient.submit("image", model="demo-digits", items=items, params={"size": 32}, seed=5)
    assert mclient.wait(job.id, timeout=120).status == JobStatus.succeeded
    pixels = []
    for r in mclient.results(job.id):
        data = mclient.store.get(r.key)
        assert r.media_type == "image/png" and r.key.endswith(".png")
        img = Image.open(io.BytesIO(data))
        assert img.size == (32, 32)
        embedded = json.loads(img.text["aigc:provenance"])
        assert embedded["job_id"] == job.id and embedded["custom_id"] == r.custom_id
        assert embedded["model"]["uri"] == "builtin://demo-digits"
        assert r.provenance["output"]["sha256"] == r.sha256  # the sidecar also has the file's digest
        pixels.append(np.asarray(img.convert("L").resize((8, 8), Image.BILINEAR), dtype=np.float64) / 255.0)
    recognised = classify(np.stack(pixels))
    assert (recognised == np.arange(10)).mean() >= 0.8


def test_write_then_narrate_text_outputs_as_wav_speech(mclient, tiny_text_model):
    mclient.register_model("tiny", "text", tiny_text_model.as_uri(), defaults={"max_new_tokens": 8})
    text = mclient.submit("text", model="tiny", items=[{"custom_id": "a1", "prompt": "Headline: Rain\n\n"},
                                                      {"custom_id": "a2", "prompt": "Headline: Sun\n\n"}],
                          params={"echo": True})
    talk = mclient.submit("audio", model="espeak-en", params={"rate": 200},
                          items=[{"custom_id": f"n-{c}", "from": {"job": text.id, "custom_id": c}}
                                 for c in ("a1", "a2")] + [{"custom_id": "hello", "text": "Hello from Riverton."}])
    assert mclient.wait(talk.id, timeout=120).status == JobStatus.succeeded
    for r in mclient.results(talk.id):
        data = mclient.store.get(r.key)
        samples, rate = sf.read(io.BytesIO(data))
        assert r.media_type == "audio/wav" and rate == 22050 and sf.info(io.BytesIO(data)).subtype == "PCM_16"
        assert r.duration_s == pytest.approx(len(samples) / rate, abs=0.01) and r.duration_s > 0.3
        assert np.abs(samples).max() > 0.05  # speech, not silence
        assert read_wav_metadata(data)["custom_id"] == r.custom_id
    manifest = [json.loads(x) for x in mclient.store.get(f"jobs/{talk.id}/manifest.jsonl").decode().splitlines()]
    assert all(m["duration_s"] > 0 for m in manifest)


def test_diffusers_and_vits_checkpoints_run_as_image_and_audio_jobs(mclient, tmp_path):
    mclient.register_model("tiny-ddim", "image", build_tiny_ddim(tmp_path / "ddim").as_uri(),
                           defaults={"num_inference_steps": 4})
    mclient.register_model("tiny-vits", "audio", build_tiny_vits(tmp_path / "vits").as_uri())
    img = mclient.submit("image", model="tiny-ddim", items=[{"custom_id": "a"}, {"custom_id": "b"}])
    wav = mclient.submit("audio", model="tiny-vits", items=["hello there", "good morning"])
    assert mclient.wait(img.id, timeout=120).status == JobStatus.succeeded
    assert mclient.wait(wav.id, timeout=120).status == JobStatus.succeeded
    a, b = list(mclient.results(img.id))
    assert a.sha256 != b.sha256 and Image.open(io.BytesIO(mclient.store.get(a.key))).size == (16, 16)
    assert all(r.duration_s > 0 and r.status == ItemStatus.succeeded for r in mclient.results(wav.id))


def test_modality_limits_are_checked_at_submit(mclient, sqlite_settings, tmp_path):
    # Sizes and steps are a diffusers pipeline's parameters (the digits backend takes neither).
    mclient.register_model("tiny-ddim", "image", build_tiny_ddim(tmp_path / "ddim").as_uri())
    with pytest.raises(SpecError, match="pixels, over the limit"):
        mclient.submit("image", model="tiny-ddim", items=[{}], params={"height": 2048, "width": 2048})
    with pytest.raises(SpecError, match="num_inference_steps"):
        mclient.submit("image", model="tiny-ddim", items=[{}], params={"num_inference_steps": 5000})
    with pytest.raises(SpecError, match="characters is over the limit"):
        mclient.submit("audio", model="espeak-en", items=[{"text": "word " * 2000}])
    with pytest.raises(SpecError, match="needs a prompt"):
        mclient.submit("audio", model="espeak-en", items=[{"custom_id": "empty"}])
    with pytest.raises(SpecError, match="rate"):
        mclient.submit("audio", model="espeak-en", items=["hi"], params={"rate": 5})
    with pytest.raises(SpecError, match="makes audio, not image"):
        mclient.submit("image", model="espeak-en", items=[{}])
