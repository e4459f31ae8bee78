"""Fine-tuning as a job: submit checks, training through the pipeline, registration with lineage, chaining."""

from __future__ import annotations

import json
import shutil

import pytest
from sqlalchemy import select

from aigc_core.errors import SpecError
from aigc_core.schema import Job, JobStatus
from tests.support.models import corpus_texts

FAST = {"epochs": 1, "max_steps": 24, "learning_rate": 3e-3, "batch_size": 4, "block_size": 64,
        "eval_every": 8, "checkpoint_every": 8}


@pytest.fixture
def dataset(tmp_path):
    p = tmp_path / "house.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts(60)))
    return p


def test_a_finetune_job_trains_registers_a_version_with_lineage_and_a_chained_job_uses_it(client, dataset):
    ft = client.finetune("tiny", dataset, "house-news", FAST)
    gen = client.submit("text", model="house-news", items=["Headline: After training\n\n"], after=ft.id)
    assert gen.status == JobStatus.waiting and gen.model == "house-news@?"
    view = client.wait(gen.id, timeout=300)
    ft_view = client.status(ft.id)
    assert ft_view.status == JobStatus.succeeded, client.events(ft.id)[-3:]
    assert view.status == JobStatus.succeeded and view.model == "house-news@1"

    (model,) = [m for m in client.models() if m["name"] == "house-news"]
    lin = model["lineage"]
    assert lin["job_id"] == ft.id and lin["base_model"] == "tiny@1"
    assert lin["dataset_sha256"].startswith("sha256:") and lin["hyperparameters"]["max_steps"] == 24
    assert lin["metrics"]["eval_loss"] < lin["metrics"]["eval_loss_before"]
    assert model["digest"] == lin["weights_digest"]

    events = [e for e in client.events(ft.id) if e["type"] == "train"]
    assert [e["step"] for e in events] == [8, 16, 24]
    assert [e["name"] for e in client.events(ft.id) if e["type"] == "checkpoint"] == ["step-00000008", "step-00000016"]

    (out,) = list(client.results(gen.id))
    assert out.provenance["model"]["name"] == "house-news" and out.provenance["model"]["version"] == 1
    assert out.provenance["model"]["weights_digest"] == model["digest"]
    (card,) = list(client.results(ft.id))
    assert json.loads(client.store.get(card.key))["model"] == "house-news@1"


def test_a_chained_job_fails_clearly_when_its_finetune_fails(client, dataset, tmp_path):
    # A base model whose directory is gone since it was registered: the training run cannot load it.
    gone = tmp_path / "no-such-model"
    gone.mkdir()
    (gone / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    (gone / "model.safetensors").write_bytes(b"\x02" + b"\x00" * 7 + b"{}")  # a valid file of no tensors
    broken = client.register_model("gone", "text", gone.as_uri(), digest="sha256:feed")
    shutil.rmtree(gone)
    ft = client.finetune("gone", dataset, "never", FAST)
    gen = client.submit("text", model="never", items=["x"], after=ft.id)
    view = client.wait(gen.id, timeout=120)
    assert client.status(ft.id).status == JobStatus.failed
    assert view.status == JobStatus.failed
    (r,) = list(client.results(gen.id))
    assert r.error == f"job {ft.id} it waited for ended failed"
    assert broken.version == 1


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"text": "ok"}\n{bad json\n', "line 3"),
    ('{"txt": "no text key"}\n', 'line 1: the object has no "text" field'),
    ("", "empty"),
])
def test_bad_datasets_are_refused_at_submit_naming_the_line(client, tmp_path, content, message):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(SpecError, match=message):
        client.finetune("tiny", p, "house", FAST)
    with client.db.session() as s:
        assert s.scalars(select(Job)).all() == []


def test_bad_finetune_requests_are_refused_and_nothing_is_written(client, dataset, tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        client.finetune("tiny", tmp_path / "missing.jsonl", "house", FAST)
    with pytest.raises(SpecError, match="unknown model 'nope'"):
        client.finetune("nope", dataset, "house", FAST)
    with pytest.raises(SpecError, match="learning_rate"):
        client.finetune("tiny", dataset, "house", {"learning_rate": 5})
    with pytest.raises(SpecError, match="unknown"):
        client.finetune("tiny", dataset, "house", {"lr": 0.1})
    with pytest.raises(SpecError, match="output_model"):
        client.finetune("tiny", dataset, "house@2", FAST)
    with client.db.session() as s:
        assert s.scalars(select(Job)).all() == []


def test_the_digits_gan_vae_trains_through_the_same_job_type_and_its_version_draws(client):
    ft = client.finetune("demo-digits", "builtin://sklearn-digits", "house-digits",
                         {"max_steps": 300, "eval_every": 100, "seed": 3})
    draw = client.submit("image", model="house-digits", items=[{"params": {"digit": d}} for d in range(3)],
                         after=ft.id)
    assert client.wait(draw.id, timeout=300).status == JobStatus.succeeded
    (model,) = [m for m in client.models() if m["name"] == "house-digits"]
    assert model["kind"] == "image" and model["backend"] == "digits"
    lin = model["lineage"]
    assert lin["base_model"] == "demo-digits@1" and lin["dataset"] == "builtin://sklearn-digits"
    assert lin["dataset_sha256"].startswith("sha256:") and lin["metrics"]["steps"] == 300
    assert lin["metrics"]["loss_after"] < lin["metrics"]["loss_before"]
    assert [e["step"] for e in client.events(ft.id) if e["type"] == "train"] == [100, 200, 300]
    assert all(r.provenance["model"]["name"] == "house-digits" for r in client.results(draw.id))


def test_digits_training_refuses_other_datasets_and_unknown_options(client, dataset):
    with pytest.raises(SpecError, match="sklearn-digits"):
        client.finetune("demo-digits", dataset, "d2", {"max_steps": 10})
    with pytest.raises(SpecError, match="unknown option"):
        client.finetune("demo-digits", "builtin://sklearn-digits", "d2", {"learning_rate": 0.1})
    with pytest.raises(SpecError, match="max_steps must be an integer"):
        client.finetune("demo-digits", "builtin://sklearn-digits", "d2", {"max_steps": 0})
    with pytest.raises(SpecError, match="image pipelines, SpeechT5 voices and the digits"):
        client.finetune("espeak-en", dataset, "d2", {})
