"""Speech backends: a tiny VITS built from VitsConfig with a character vocabulary, and espeak-ng."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
import torch

from aigc_models import GenRequest, load_backend
from aigc_models.base import BackendError

SENTENCE = "Hello world, this is a test of the speech engine."


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    """Tiny models on a busy 2-core machine run fastest on one thread."""


@pytest.fixture(scope="module")
def vits_dir(tmp_path_factory):
    from tests.support.models import build_tiny_vits

    return build_tiny_vits(tmp_path_factory.mktemp("models") / "tiny-vits")


@pytest.fixture(scope="module")
def tts(vits_dir):
    return load_backend("hf-tts", vits_dir, device="cpu")


@pytest.fixture(scope="module")
def espeak():
    return load_backend("espeak", "builtin://espeak-en", device="cpu")


def _read(out):
    data, rate = sf.read(io.BytesIO(out.data), dtype="int16")
    return data, rate, sf.info(io.BytesIO(out.data))


# ---- transformers VITS ----------------------------------------------------------------------------

def test_tts_writes_pcm16_wav_with_its_rate_and_duration_recorded(tts):
    out = tts.generate([GenRequest(0, "hello world", {}, seed=1)])[0]
    data, rate, info = _read(out)
    assert (out.media_type, out.ext, info.format, info.subtype) == ("audio/wav", "wav", "WAV", "PCM_16")
    assert rate == out.info["sample_rate"] == 16000
    assert len(data) == out.info["samples"] > 0
    assert out.info["duration_s"] == pytest.approx(len(data) / 16000, abs=1e-3)


def test_a_tts_item_sounds_the_same_alone_as_in_a_batch(tts):
    reqs = [GenRequest(i, t, {}, seed=10 + i) for i, t in enumerate(["hello world", "a longer sentence, here", "hi"])]
    batched = tts.generate(reqs)
    assert [o.data for o in batched] == [tts.generate([r])[0].data for r in reqs[::-1]][::-1]
    assert {o.info["batch_size"] for o in batched} == {3}


def test_the_seed_decides_the_tts_noise(tts):
    same = {tts.generate([GenRequest(0, "hello world", {}, seed=4)])[0].data for _ in range(2)}
    others = {tts.generate([GenRequest(0, "hello world", {}, seed=s)])[0].data for s in range(5, 9)}
    assert len(same) == 1 and len(others) == 4 and not same & others


def test_tts_leaves_the_global_random_state_alone(tts):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tts.generate([GenRequest(0, "hello world", {}, seed=9)])
    assert torch.equal(torch.rand(3), expected)


def test_a_faster_speaking_rate_makes_shorter_audio(tts):
    slow, fast = tts.generate([GenRequest(0, SENTENCE, {"speaking_rate": 0.5}, seed=2),
                               GenRequest(1, SENTENCE, {"speaking_rate": 2.0}, seed=2)])
    assert fast.info["samples"] < slow.info["samples"] / 2


def test_noise_scale_zero_makes_the_seed_irrelevant(tts):
    p = {"noise_scale": 0.0, "noise_scale_duration": 0.0}
    outs = {tts.generate([GenRequest(0, "hello world", p, seed=s)])[0].data for s in range(3)}
    assert len(outs) == 1
    assert tts.model.noise_scale == pytest.approx(0.667)  # restored after the call


@pytest.mark.parametrize(("params", "message"), [
    ({"speaking_rate": 50}, "speaking_rate"), ({"noise_scale": 5}, "noise_scale"), ({"speaker_id": 1}, "speaker_id"),
])
def test_bad_tts_params_are_errors(tts, params, message):
    with pytest.raises(BackendError, match=message):
        tts.generate([GenRequest(0, "hello", params, seed=0)])


def test_a_prompt_with_no_known_character_is_an_error(tts):
    with pytest.raises(BackendError, match="vocabulary"):
        tts.generate([GenRequest(0, "12345", {}, seed=0)])


def test_a_directory_that_is_no_tts_model_is_a_load_error(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(BackendError, match="'gpt2' is not supported"):
        load_backend("hf-tts", tmp_path / "gpt2", device="cpu")
    with pytest.raises(BackendError, match="cannot load"):
        load_backend("hf-tts", tmp_path, device="cpu")
    with pytest.raises(BackendError, match="not a directory"):  # and never a hub lookup
        load_backend("hf-tts", tmp_path / "org" / "missing", device="cpu")


# ---- espeak-ng ------------------------------------------------------------------------------------

def test_espeak_speaks_english_offline_at_22050_hz(espeak):
    out = espeak.generate([GenRequest(0, SENTENCE, {}, seed=0)])[0]
    data, rate, info = _read(out)
    assert rate == out.info["sample_rate"] == 22050 and info.subtype == "PCM_16"
    assert 1.5 < out.info["duration_s"] < 5.0  # about 2.5 s at 175 words a minute
    loud = np.abs(data.astype(np.int32)) > 1000
    assert loud.mean() > 0.2  # speech, not silence or a click
    assert np.sqrt(np.mean(data.astype(np.float64) ** 2)) > 500


def test_longer_text_takes_longer_to_say(espeak):
    short, long = espeak.generate([GenRequest(0, "Hello.", {}, 0), GenRequest(1, SENTENCE * 2, {}, 1)])
    assert long.info["samples"] > 4 * short.info["samples"]


def test_an_espeak_item_sounds_the_same_alone_as_in_a_batch(espeak):
    # espeak-ng carries state from one utterance to the next; without a fresh library each item drifted.
    reqs = [GenRequest(i, t, {}, seed=i) for i, t in enumerate([SENTENCE, "Another one.", SENTENCE])]
    batched = espeak.generate(reqs)
    assert batched[0].data == batched[2].data
    assert [o.data for o in batched] == [espeak.generate([r])[0].data for r in reqs[::-1]][::-1]


def test_rate_and_pitch_change_the_speech(espeak):
    base, fast, high = espeak.generate([GenRequest(0, SENTENCE, {}, 0), GenRequest(1, SENTENCE, {"rate": 350}, 0),
                                        GenRequest(2, SENTENCE, {"pitch": 90}, 0)])
    assert fast.info["duration_s"] < 0.7 * base.info["duration_s"]
    assert high.data != base.data and high.info["pitch"] == 90


def test_the_builtin_name_picks_the_default_voice():
    german = load_backend("espeak", "builtin://espeak-de", device="cpu")
    english = load_backend("espeak", "builtin://espeak-en", device="cpu")
    req = GenRequest(0, "Guten Tag", {}, seed=0)
    assert german.generate([req])[0].info["voice"] == "de"
    assert german.generate([req])[0].data == english.generate([GenRequest(0, "Guten Tag", {"voice": "de"}, 0)])[0].data


@pytest.mark.parametrize(("params", "message"), [
    ({"voice": "no-such-voice"}, "no voice"),
    ({"voice": "../../etc/passwd"}, "bad voice"),
    ({"rate": 20}, "rate must be between 80 and 450"),
    ({"pitch": 101}, "pitch must be between 0 and 100"),
])
def test_bad_espeak_params_are_errors(espeak, params, message):
    with pytest.raises(BackendError, match=message):
        espeak.generate([GenRequest(0, "Hello.", params, seed=0)])
