"""Speech fine-tuning: a SpeechT5 voice trained on (wav, text) pairs through the job type, registered
with lineage and speaking differently; VITS refused with the reason; bad clips refused by line."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import soundfile as sf

from aigc_core.errors import SpecError
from aigc_core.schema import JobStatus

FAST = {"max_steps": 12, "learning_rate": 2e-3, "batch_size": 2, "eval_every": 4, "checkpoint_every": 4,
        "validation_texts": ["hello"]}
TEXTS = ["hello there", "good morning", "the news at ten", "weather today"]


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    """Tiny models on a busy 2-core machine run fastest on one thread."""


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    from tests.support.audio_models import build_tiny_speecht5

    return build_tiny_speecht5(tmp_path_factory.mktemp("models") / "tiny-speecht5")


@pytest.fixture
def voice_client(client, t5_dir, tmp_path_factory):
    from tests.support.models import build_tiny_vits

    client.register_model("tiny-t5", "audio", t5_dir.as_uri())
    client.register_model("tiny-vits", "audio", build_tiny_vits(tmp_path_factory.mktemp("m") / "vits").as_uri())
    return client


def write_clips(root, texts=TEXTS):
    """Half a second of a tone per text, at 16 kHz and 22.05 kHz alternately (resampled in training)."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, text in enumerate(texts):
        rate = 16000 if i % 2 == 0 else 22050
        t = np.arange(rate // 2) / rate
        sf.write(root / f"{i:03d}.wav", (0.3 * np.sin(2 * np.pi * (200 + 90 * i) * t)).astype(np.float32), rate,
                 subtype="PCM_16")
        lines.append(json.dumps({"file_name": f"{i:03d}.wav", "text": text}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _waves(client, job_id) -> list[np.ndarray]:
    return [sf.read(io.BytesIO(client.store.get(r.key)))[0] for r in client.results(job_id)]


def test_a_speecht5_voice_fine_tunes_registers_and_speaks_differently_with_the_same_seed(voice_client, tmp_path):
    c = voice_client
    ft = c.finetune("tiny-t5", write_clips(tmp_path / "presenter"), "house-voice", FAST)
    after = c.submit("audio", model="house-voice", items=["good evening"], seed=3, after=ft.id)
    before = c.submit("audio", model="tiny-t5@1", items=["good evening"], seed=3)
    assert c.wait(after.id, timeout=300).status == JobStatus.succeeded, c.events(ft.id)[-3:]
    assert c.wait(before.id, timeout=120).status == JobStatus.succeeded

    (model,) = [m for m in c.models() if m["name"] == "house-voice"]
    lin = model["lineage"]
    assert model["kind"] == "audio" and model["backend"] == "hf-tts" and lin["trainer"] == "speecht5"
    assert lin["base_model"] == "tiny-t5@1" and lin["hyperparameters"]["speaker_id"] == 0
    assert lin["metrics"]["eval_loss"] < lin["metrics"]["eval_loss_before"] and lin["metrics"]["steps"] == 12
    assert [e["step"] for e in c.events(ft.id) if e["type"] == "train"] == [4, 8, 12]
    (new,), (old,) = _waves(c, after.id), _waves(c, before.id)
    assert len(new) != len(old) or np.abs(new - old).mean() > 1e-3
    (card,) = list(c.results(ft.id))
    assert [u.rsplit("/", 1)[1] for u in json.loads(c.store.get(card.key))["validation"]] == [
        "before-00.wav", "after-00.wav"]


def test_vits_is_refused_with_the_reason_and_bad_clips_by_line(voice_client, tmp_path):
    c = voice_client
    data = write_clips(tmp_path / "ok")
    with pytest.raises(SpecError, match="transformers cannot train VITS"):
        c.finetune("tiny-vits", data, "v", FAST)
    with pytest.raises(SpecError, match="unknown speech fine-tuning option"):
        c.finetune("tiny-t5", data, "v", {"rank": 4})
    (data / "002.wav").write_bytes(b"RIFF not really")
    with pytest.raises(SpecError, match=r"line 3: 002\.wav: not a readable audio file"):
        c.finetune("tiny-t5", data, "v", FAST)
    long = write_clips(tmp_path / "long", TEXTS[:1])
    sf.write(long / "000.wav", np.zeros(16000 * 31, np.float32), 16000)
    with pytest.raises(SpecError, match=r"line 1: 000\.wav: 31\.00 s"):
        c.finetune("tiny-t5", long, "v", FAST)


def test_a_stopped_speech_run_resumes_to_the_same_weights(t5_dir, tmp_path):
    from safetensors.torch import load_file

    from aigc_models.image_data import read_records
    from aigc_models.speech_data import AUDIO_SUFFIXES, SpeechFinetuneConfig
    from aigc_models.speech_finetune import finetune_speecht5

    data = write_clips(tmp_path / "clips")
    records = read_records(data, captions=True, suffixes=AUDIO_SUFFIXES)
    cfg = SpeechFinetuneConfig(max_steps=8, learning_rate=2e-3, batch_size=2, eval_every=4, checkpoint_every=4)
    whole = finetune_speecht5(t5_dir, data, records, tmp_path / "whole", cfg, checkpoint_dir=tmp_path / "c1",
                              device="cpu")
    asked = iter(range(100))
    cut = finetune_speecht5(t5_dir, data, records, tmp_path / "cut", cfg, checkpoint_dir=tmp_path / "c2",
                            should_stop=lambda: next(asked) == 5, device="cpu")
    assert cut["interrupted"] and cut["steps"] == 5
    resumed = finetune_speecht5(t5_dir, data, records, tmp_path / "cut", cfg, checkpoint_dir=tmp_path / "c2",
                                resume_from=tmp_path / "c2" / "step-00000005", device="cpu")
    assert resumed["steps"] == 8 and resumed["eval_loss"] == pytest.approx(whole["eval_loss"], rel=1e-5)
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert (tmp_path / "cut" / "vocoder" / "model.safetensors").is_file()  # the base's vocoder goes along
