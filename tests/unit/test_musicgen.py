"""MusicGen through the `hf-tts` backend: a tiny checkpoint built from configs, loaded by model_type."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
import torch

from aigc_models import GenRequest, load_backend
from aigc_models.base import BackendError
from aigc_models.musicgen import MusicgenGenerator

PROMPT = "Warm lo-fi piano with soft drums"


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    """Tiny models on a busy 2-core machine run fastest on one thread."""


@pytest.fixture(scope="module")
def musicgen_dir(tmp_path_factory):
    from tests.support.audio_models import build_tiny_musicgen

    return build_tiny_musicgen(tmp_path_factory.mktemp("models") / "tiny-musicgen")


@pytest.fixture(scope="module")
def music(musicgen_dir):
    return load_backend("hf-tts", musicgen_dir, device="cpu")


def _read(out):
    data, rate = sf.read(io.BytesIO(out.data), dtype="int16")
    return data, rate, sf.info(io.BytesIO(out.data))


def test_hf_tts_loads_a_musicgen_checkpoint_by_its_model_type(music):
    assert isinstance(music, MusicgenGenerator)
    assert music.describe()["sample_rate"] == 16000 and music.describe()["frame_rate"] == 50


def test_musicgen_writes_a_pcm16_wav_of_the_asked_duration(music):
    out = music.generate([GenRequest(0, PROMPT, {"duration": 1.5}, seed=1)])[0]
    data, rate, info = _read(out)
    assert (out.media_type, out.ext, info.format, info.subtype) == ("audio/wav", "wav", "WAV", "PCM_16")
    assert rate == out.info["sample_rate"] == music.model.config.audio_encoder.sampling_rate
    assert len(data) == out.info["samples"] == 24000 and out.info["duration_s"] == 1.5
    assert np.abs(data).max() > 1000  # sound, not silence
    # 75 frames at 50 a second, plus one step for the second codebook's delay
    assert out.info["max_new_tokens"] == 76 and out.info["guidance_scale"] == 3.0  # the checkpoint's own
    assert out.info["top_k"] == 250 and out.info["seed"] == 1


def test_max_new_tokens_sets_the_length_in_decoder_steps(music):
    out = music.generate([GenRequest(0, PROMPT, {"max_new_tokens": 26}, seed=1)])[0]
    assert out.info["samples"] == 25 * 320  # 25 EnCodec frames of 320 samples each
    assert out.info["duration_requested"] is None


def test_a_musicgen_item_sounds_the_same_alone_as_in_a_batch(music):
    reqs = [GenRequest(i, p, {"duration": 1.0}, seed=20 + i)
            for i, p in enumerate([PROMPT, "Upbeat eighties synth-pop", "Quiet jazz for a late night"])]
    batched = music.generate(reqs)
    assert [o.data for o in batched] == [music.generate([r])[0].data for r in reqs[::-1]][::-1]
    assert {o.info["batch_size"] for o in batched} == {3}
    assert len({o.data for o in batched}) == 3


def test_the_seed_decides_the_music(music):
    p = {"duration": 0.5}
    same = {music.generate([GenRequest(0, PROMPT, p, seed=4)])[0].data for _ in range(2)}
    others = {music.generate([GenRequest(0, PROMPT, p, seed=s)])[0].data for s in range(5, 8)}
    assert len(same) == 1 and len(others) == 3 and not same & others


def test_temperature_zero_is_greedy_and_ignores_the_seed(music):
    p = {"duration": 0.5, "temperature": 0.0}
    assert len({music.generate([GenRequest(0, PROMPT, p, seed=s)])[0].data for s in range(3)}) == 1


def test_guidance_scale_changes_the_music(music):
    # Greedy, so only the guidance differs (an untrained model's text barely moves its sampled codes).
    p = {"duration": 0.5, "temperature": 0.0}
    a, b = music.generate([GenRequest(0, PROMPT, {**p, "guidance_scale": 1.0}, seed=3),
                           GenRequest(1, PROMPT, {**p, "guidance_scale": 6.0}, seed=3)])
    assert a.data != b.data and (a.info["guidance_scale"], b.info["guidance_scale"]) == (1.0, 6.0)


def test_musicgen_leaves_the_global_random_state_alone(music):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    music.generate([GenRequest(0, PROMPT, {"duration": 0.3}, seed=9)])
    assert torch.equal(torch.rand(3), expected)


def test_a_musicgen_directory_without_weights_is_a_load_error(musicgen_dir, tmp_path):
    (tmp_path / "config.json").write_bytes((musicgen_dir / "config.json").read_bytes())
    with pytest.raises(BackendError, match="cannot load a MusicGen model"):
        load_backend("hf-tts", tmp_path, device="cpu")


def test_a_musicgen_job_of_two_items_succeeds_through_the_embedded_client(sqlite_settings, musicgen_dir):
    from aigc_core.errors import SpecError
    from aigc_core.schema import JobStatus
    from aigc_models.media import read_wav_metadata
    from scheduler import Client

    client = Client(sqlite_settings.model_copy(update={"torch_threads": 1}))
    client.register_model("tiny-musicgen", "audio", musicgen_dir.as_uri(), defaults={"duration": 1.0})
    job = client.submit("audio", model="tiny-musicgen", items=["lo-fi piano", "synth-pop"],
                        params={"guidance_scale": 2.0}, seed=5)
    assert client.wait(job.id, timeout=120).status == JobStatus.succeeded
    results = list(client.results(job.id))
    assert len(results) == 2
    for r in results:
        data = client.store.get(r.key)
        samples, rate = sf.read(io.BytesIO(data))
        assert r.media_type == "audio/wav" and rate == 16000 and len(samples) == 16000
        assert r.duration_s == pytest.approx(1.0) and np.abs(samples).max() > 0.01
        assert r.provenance["seed"] == 5 + r.index
        assert read_wav_metadata(data)["custom_id"] == r.custom_id
    for bad in ({"duration": 0}, {"duration": 601}, {"guidance_scale": -1}, {"max_new_tokens": 0}):
        with pytest.raises(SpecError, match=next(iter(bad))):  # refused at submit, before any write
            client.submit("audio", model="tiny-musicgen", items=["x"], params=bad)


def test_an_unsupported_model_type_names_every_supported_one(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bark"}')
    with pytest.raises(BackendError, match=r"'bark' is not supported \(supported: vits, musicgen, speecht5\)"):
        load_backend("hf-tts", tmp_path, device="cpu")
