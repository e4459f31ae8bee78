"""SpeechT5 through the `hf-tts` backend: a tiny checkpoint with its HiFi-GAN in vocoder/, a
sentencepiece tokenizer trained here and speaker x-vectors in the model directory."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from aigc_models import GenRequest, load_backend
from aigc_models.base import BackendError
from aigc_models.speecht5 import SpeechT5Generator

TEXT = "Hello world."


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    """Tiny models on a busy 2-core machine run fastest on one thread."""


@pytest.fixture(scope="module")
def speecht5_dir(tmp_path_factory):
    from tests.support.audio_models import build_tiny_speecht5

    return build_tiny_speecht5(tmp_path_factory.mktemp("models") / "tiny-speecht5")


@pytest.fixture(scope="module")
def speech(speecht5_dir):
    return load_backend("hf-tts", speecht5_dir, device="cpu")


def _copy(src, dst, *, without=()):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*without))
    return dst


def test_hf_tts_loads_speecht5_with_its_vocoder_and_speakers(speech):
    assert isinstance(speech, SpeechT5Generator)
    d = speech.describe()
    assert (d["vocoder"], d["speakers"], d["sample_rate"]) == ("SpeechT5HifiGan", 3, 16000)
    assert type(speech.tokenizer).__name__ == "SpeechT5Tokenizer"  # the sentencepiece model, as released


def test_speecht5_writes_a_pcm16_wav_at_the_vocoders_rate(speech):
    out = speech.generate([GenRequest(0, TEXT, {}, seed=1)])[0]
    data, rate = sf.read(io.BytesIO(out.data), dtype="int16")
    info = sf.info(io.BytesIO(out.data))
    assert (out.media_type, out.ext, info.format, info.subtype) == ("audio/wav", "wav", "WAV", "PCM_16")
    assert rate == out.info["sample_rate"] == speech.vocoder.config.sampling_rate == 16000
    assert len(data) == out.info["samples"] > 0 and len(data) % 256 == 0  # whole vocoder hops
    assert out.info["duration_s"] == pytest.approx(len(data) / 16000, abs=1e-3) and out.info["duration_s"] > 0.5
    assert np.abs(data).max() > 1000 and out.info["speaker_id"] == 0


def test_a_speecht5_item_sounds_the_same_alone_as_in_a_batch(speech):
    reqs = [GenRequest(i, t, {}, seed=30 + i) for i, t in enumerate([TEXT, "Rain is expected.", "Hi there."])]
    batched = speech.generate(reqs)
    assert [o.data for o in batched] == [speech.generate([r])[0].data for r in reqs[::-1]][::-1]
    assert {o.info["batch_size"] for o in batched} == {3} and len({o.data for o in batched}) == 3


def test_the_seed_decides_the_prenet_dropout(speech):
    same = {speech.generate([GenRequest(0, TEXT, {}, seed=4)])[0].data for _ in range(2)}
    others = {speech.generate([GenRequest(0, TEXT, {}, seed=s)])[0].data for s in range(5, 8)}
    assert len(same) == 1 and len(others) == 3 and not same & others


def test_speaker_id_picks_a_row_of_the_embeddings_file(speech):
    outs = speech.generate([GenRequest(i, TEXT, {"speaker_id": i}, seed=2) for i in range(3)])
    assert len({o.data for o in outs}) == 3 and [o.info["speaker_id"] for o in outs] == [0, 1, 2]
    with pytest.raises(BackendError, match=r"speaker_id must be in 0\.\.2"):
        speech.generate([GenRequest(0, TEXT, {"speaker_id": 3}, seed=0)])


def test_speecht5_leaves_the_global_random_state_alone(speech):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    speech.generate([GenRequest(0, "Hi.", {}, seed=9)])
    assert torch.equal(torch.rand(3), expected)


def test_one_x_vector_in_safetensors_is_speaker_zero(speecht5_dir, tmp_path):
    from safetensors.numpy import save_file

    d = _copy(speecht5_dir, tmp_path / "m", without=["speaker_embeddings.npy"])
    vector = np.load(speecht5_dir / "speaker_embeddings.npy")[1]
    save_file({"speaker_embeddings": vector}, str(d / "speaker_embeddings.safetensors"))
    one = load_backend("hf-tts", d, device="cpu")
    assert one.describe()["speakers"] == 1
    np.testing.assert_array_equal(one.speakers[0], vector)


@pytest.mark.parametrize(("without", "message"), [
    (["vocoder"], "HiFi-GAN vocoder"), (["speaker_embeddings.npy"], "speaker_embeddings.safetensors or"),
])
def test_a_speecht5_checkpoint_missing_a_part_is_a_load_error_that_says_which(speecht5_dir, tmp_path, without,
                                                                              message):
    with pytest.raises(BackendError, match=message):
        load_backend("hf-tts", _copy(speecht5_dir, tmp_path / "m", without=without), device="cpu")


def test_speaker_embeddings_of_the_wrong_width_are_a_load_error(speecht5_dir, tmp_path):
    d = _copy(speecht5_dir, tmp_path / "m")
    np.save(d / "speaker_embeddings.npy", np.zeros((2, 128), np.float32))
    with pytest.raises(BackendError, match=r"shaped \(512,\) or \(speakers, 512\)"):
        load_backend("hf-tts", d, device="cpu")


def test_a_speecht5_job_of_two_items_succeeds_through_the_embedded_client(sqlite_settings, speecht5_dir):
    from aigc_core.schema import JobStatus
    from aigc_models.media import read_wav_metadata
    from scheduler import Client

    client = Client(sqlite_settings.model_copy(update={"torch_threads": 1}))
    client.register_model("tiny-speecht5", "audio", speecht5_dir.as_uri())
    job = client.submit("audio", model="tiny-speecht5", items=[{"custom_id": "a", "text": "Good morning."},
                                                               {"custom_id": "b", "text": "Hi."}],
                        params={"speaker_id": 1}, seed=3)
    assert client.wait(job.id, timeout=120).status == JobStatus.succeeded
    results = list(client.results(job.id))
    assert [r.custom_id for r in results] == ["a", "b"]
    for r in results:
        data = client.store.get(r.key)
        samples, rate = sf.read(io.BytesIO(data))
        assert r.media_type == "audio/wav" and rate == 16000 and r.duration_s == pytest.approx(len(samples) / rate)
        assert r.duration_s > 0 and np.abs(samples).max() > 0.01
        assert r.provenance["seed"] == 3 + r.index
        assert read_wav_metadata(data)["custom_id"] == r.custom_id
