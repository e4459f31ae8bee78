"""Fine-tuning a tiny GPT-2 on the shipped news corpus: loss, checkpoints, exact resume, datasets, config."""

from __future__ import annotations

import hashlib
import json
import sys
from importlib import resources
from pathlib import Path

import pytest
import torch

from aigc_models.finetune import (
    DatasetError,
    FinetuneConfig,
    _evaluate,
    _token_blocks,
    dataset_digest,
    finetune_causal_lm,
    iter_dataset_texts,
    load_dataset_texts,
    split_train_val,
    validate_dataset,
)
from tests.support.models import build_tiny_text_model

# A short run: max_steps decides, never the clock, so results do not depend on the machine's load.
SHORT = dict(learning_rate=3e-3, batch_size=8, block_size=64, eval_every=10, warmup_steps=5, patience=0,
             max_steps=30, checkpoint_every=0, epochs=100)


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    """Tiny models on a busy 2-core machine run fastest on one thread."""


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return build_tiny_text_model(tmp_path_factory.mktemp("base") / "tiny-gpt2", train_seconds=0)


@pytest.fixture(scope="module")
def bodies() -> list[str]:
    raw = resources.files("aigc_models").joinpath("data/news_corpus.jsonl").read_text(encoding="utf-8")
    return [json.loads(line)["body"] for line in raw.splitlines() if line.strip()][:80]


@pytest.fixture(scope="module")
def corpus_file(bodies, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "news.jsonl"
    path.write_text("".join(json.dumps({"text": b}) + "\n\n" for b in bodies), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def straight(base, bodies, tmp_path_factory):
    """An uninterrupted 30-step run that checkpoints every 10 steps and keeps the newest two."""
    out = tmp_path_factory.mktemp("straight")
    events, saved = [], []
    cfg = FinetuneConfig(**{**SHORT, "checkpoint_every": 10, "keep_checkpoints": 2})
    metrics = finetune_causal_lm(base, bodies, out, cfg, on_event=events.append,
                                 on_checkpoint=lambda d, s: saved.append((d, s)))
    return {"out": out, "events": events, "saved": saved, "metrics": metrics, "cfg": cfg}


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(model_dir / "model.safetensors")


def _stop_after(n: int):
    calls = iter(range(1 << 30))
    return lambda: next(calls) >= n  # asked once before each step


# ---- training -------------------------------------------------------------------------------------

def test_finetuning_lowers_held_out_loss_and_writes_a_plain_model(base, corpus_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = load_dataset_texts(corpus_file)
    cfg = FinetuneConfig(**{**SHORT, "max_steps": 60})
    m = finetune_causal_lm(base, texts, tmp_path / "out", cfg)
    assert m["steps"] == 60 and m["stop_reason"] == "max_steps"
    assert m["eval_loss"] < m["eval_loss_before"] - 0.5
    assert m["train_tokens"] > 0 and m["val_tokens"] > 0 and not m["stopped_early"] and not m["interrupted"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = tok("The council voted", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4
    assert json.loads((tmp_path / "out" / "finetune.json").read_text())["metrics"]["steps"] == 60


def test_events_report_progress_every_eval_every_steps(straight):
    events = straight["events"]
    assert [e["step"] for e in events] == [10, 20, 30]
    assert set(events[0]) >= {"step", "epoch", "loss", "lr", "eval_loss", "seconds"}
    assert events[0]["epoch"] < events[1]["epoch"] < events[2]["epoch"]
    assert straight["metrics"]["eval_loss"] == min(e["eval_loss"] for e in events)


def test_checkpoints_hold_model_optimizer_and_state_and_old_ones_are_pruned(straight):
    saved = straight["saved"]
    assert [s["step"] for _, s in saved] == [10, 20]  # none at the last step: the final model is the output
    ckpt_dir, state = saved[-1]
    assert sorted(p.name for p in ckpt_dir.parent.iterdir()) == ["step-00000010", "step-00000020"]
    assert json.loads((ckpt_dir / "trainer_state.json").read_text()) == state
    assert state["epoch_index"] * state["steps_per_epoch"] + state["batch_in_epoch"] == 20
    assert {"best_eval_loss", "eval_loss_before", "lr", "config", "seconds"} <= set(state)
    extra = torch.load(ckpt_dir / "optimizer.pt", weights_only=True)
    assert extra["optimizer"]["state"] and extra["torch_rng"].dtype == torch.uint8
    assert (ckpt_dir / "model.safetensors").exists() and (ckpt_dir / "tokenizer.json").exists()


def test_checkpoints_beyond_keep_checkpoints_are_removed(base, bodies, tmp_path):
    cfg = FinetuneConfig(**{**SHORT, "max_steps": 9, "checkpoint_every": 2, "keep_checkpoints": 1,
                            "val_fraction": 0.0})
    finetune_causal_lm(base, bodies, tmp_path / "out", cfg)
    assert [p.name for p in (tmp_path / "out" / "checkpoints").iterdir()] == ["step-00000008"]


def test_a_stopped_run_resumes_to_the_same_place_as_an_uninterrupted_one(base, bodies, straight, tmp_path):
    cfg, ref = straight["cfg"], straight["metrics"]
    saved = []
    stopped = finetune_causal_lm(base, bodies, tmp_path / "a", cfg, should_stop=_stop_after(13),
                                 on_checkpoint=lambda d, s: saved.append(d))
    assert stopped["interrupted"] and stopped["steps"] == 13
    assert not (tmp_path / "a" / "model.safetensors").exists()  # a stopped run leaves no model
    assert saved[-1].name == "step-00000013" and Path(stopped["checkpoint"]) == saved[-1]

    events = []
    resumed = finetune_causal_lm(base, bodies, tmp_path / "b", cfg, resume_from=saved[-1], on_event=events.append)
    assert resumed["steps"] == ref["steps"] == 30
    for key in ("train_loss", "eval_loss", "eval_loss_before", "final_eval_loss"):
        assert resumed[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), key
    assert [e["step"] for e in events] == [20, 30]
    assert events[0]["loss"] == pytest.approx(straight["events"][1]["loss"], rel=1e-5)  # steps 11-20 span the stop
    a, b = _weights(straight["out"]), _weights(tmp_path / "b")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_resume_refuses_a_different_seed_or_dataset(base, bodies, straight, tmp_path):
    ckpt = straight["saved"][-1][0]
    with pytest.raises(ValueError, match="seed"):
        finetune_causal_lm(base, bodies, tmp_path, FinetuneConfig(**{**SHORT, "seed": 1}), resume_from=ckpt)
    with pytest.raises(ValueError, match="dataset differs"):
        finetune_causal_lm(base, bodies[:-1], tmp_path, straight["cfg"], resume_from=ckpt)


def test_early_stopping_keeps_the_best_held_out_weights(base, bodies, tmp_path):
    # six documents, half held out, a high learning rate: the model memorizes and held-out loss turns up
    cfg = FinetuneConfig(**{**SHORT, "learning_rate": 1e-2, "batch_size": 4, "block_size": 32, "val_fraction": 0.5,
                            "eval_every": 5, "patience": 3, "warmup_steps": 0, "max_steps": 300})
    events = []
    m = finetune_causal_lm(base, bodies[:6], tmp_path / "out", cfg, on_event=events.append)
    assert m["stopped_early"] and m["steps"] < 300
    assert m["eval_loss"] == min(e["eval_loss"] for e in events) < m["final_eval_loss"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, val_docs = split_train_val(bodies[:6], 0.5, cfg.seed)
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    kept = AutoModelForCausalLM.from_pretrained(tmp_path / "out", use_safetensors=True)
    val = _token_blocks(tok, val_docs, cfg.block_size, allow_short=True)
    assert _evaluate(kept, val, cfg.batch_size, "cpu") == pytest.approx(m["eval_loss"], rel=1e-5)


def test_keep_best_off_keeps_the_last_weights_even_when_held_out_loss_rose(base, bodies, tmp_path):
    cfg = FinetuneConfig(**{**SHORT, "learning_rate": 1e-2, "batch_size": 4, "block_size": 32, "val_fraction": 0.5,
                            "eval_every": 5, "patience": 0, "warmup_steps": 0, "max_steps": 60,
                            "keep_best": False})
    m = finetune_causal_lm(base, bodies[:6], tmp_path / "out", cfg)
    assert m["eval_loss"] < m["final_eval_loss"]  # the held-out loss turned up: best and last differ
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, val_docs = split_train_val(bodies[:6], 0.5, cfg.seed)
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    kept = AutoModelForCausalLM.from_pretrained(tmp_path / "out", use_safetensors=True)
    val = _token_blocks(tok, val_docs, cfg.block_size, allow_short=True)
    assert _evaluate(kept, val, cfg.batch_size, "cpu") == pytest.approx(m["final_eval_loss"], rel=1e-5)


def test_a_run_that_never_beats_the_base_model_returns_the_base_weights(base, bodies, tmp_path):
    cfg = FinetuneConfig(**{**SHORT, "learning_rate": 1.0, "warmup_steps": 0, "max_steps": 10, "eval_every": 5})
    m = finetune_causal_lm(base, bodies, tmp_path / "out", cfg)
    assert m["best_step"] == 0 and m["eval_loss"] == m["eval_loss_before"] < m["final_eval_loss"]
    before, after = _weights(base), _weights(tmp_path / "out")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_max_seconds_bounds_training_time(base, bodies, tmp_path):
    cfg = FinetuneConfig(**{**SHORT, "max_steps": None, "max_seconds": 0.5, "epochs": 100, "val_fraction": 0.0})
    m = finetune_causal_lm(base, bodies, tmp_path / "out", cfg)
    assert m["stop_reason"] == "max_seconds" and 0 < m["steps"] < m["total_steps"]
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_max_steps_overrides_epochs_and_cycles_the_data(base, bodies, tmp_path):
    # As transformers' TrainingArguments: max_steps > 0 wins over the default epochs=3, even when the
    # epochs would end far sooner; the run goes round the training split as often as it needs.
    cfg = FinetuneConfig(**{**SHORT, "epochs": 0.01, "max_steps": 20, "eval_every": 10, "val_fraction": 0.0})
    events: list[dict] = []
    m = finetune_causal_lm(base, bodies, tmp_path / "out", cfg, on_event=events.append)
    assert m["steps"] == 20 and m["total_steps"] == 20 and m["stop_reason"] == "max_steps"
    assert [e["step"] for e in events] == [10, 20]
    assert m["epochs"] > 0.01


def test_a_block_longer_than_the_model_context_is_refused(base, bodies, tmp_path):
    with pytest.raises(ValueError, match="context of 256"):
        finetune_causal_lm(base, bodies, tmp_path, FinetuneConfig(**{**SHORT, "block_size": 512}))


# ---- LoRA -----------------------------------------------------------------------------------------

def test_lora_without_peft_is_a_clear_error(base, bodies, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # makes `import peft` fail
    with pytest.raises(ImportError, match="needs the 'peft' package"):
        finetune_causal_lm(base, bodies, tmp_path, FinetuneConfig(**{**SHORT, "lora": True}))


def test_lora_trains_only_attention_and_saves_a_merged_plain_model(base, bodies, tmp_path):
    pytest.importorskip("peft")
    cfg = FinetuneConfig(**{**SHORT, "lora": True, "learning_rate": 3e-2, "max_steps": 20})
    m = finetune_causal_lm(base, bodies, tmp_path / "out", cfg)
    assert m["lora"] and m["eval_loss"] < m["eval_loss_before"]
    out = tmp_path / "out"
    assert not (out / "adapter_config.json").exists()
    before, after = _weights(base), _weights(out)
    assert set(before) == set(after)  # no lora_A/lora_B keys: the adapter is merged in
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".attn.c_attn.weight" in k for k in changed)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, val_docs = split_train_val(bodies, cfg.val_fraction, cfg.seed)
    val = _token_blocks(AutoTokenizer.from_pretrained(out), val_docs, cfg.block_size, allow_short=True)
    merged = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    assert _evaluate(merged, val, cfg.batch_size, "cpu") == pytest.approx(m["eval_loss"], rel=1e-4)


def test_a_stopped_lora_run_resumes_to_the_same_place(base, bodies, tmp_path):
    pytest.importorskip("peft")
    cfg = FinetuneConfig(**{**SHORT, "lora": True, "learning_rate": 3e-2, "max_steps": 16, "eval_every": 8})
    ref = finetune_causal_lm(base, bodies, tmp_path / "ref", cfg)
    part = finetune_causal_lm(base, bodies, tmp_path / "a", cfg, should_stop=_stop_after(5))
    assert (Path(part["checkpoint"]) / "adapter_model.safetensors").exists()
    resumed = finetune_causal_lm(base, bodies, tmp_path / "b", cfg, resume_from=Path(part["checkpoint"]))
    assert resumed["steps"] == ref["steps"] == 16
    assert resumed["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-5)


# ---- datasets -------------------------------------------------------------------------------------

def _file(tmp_path: Path, name: str, content: bytes | str) -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def test_jsonl_dataset_yields_texts_and_skips_blank_lines(tmp_path):
    path = _file(tmp_path, "d.jsonl", '{"text": "one", "id": 1}\n\n  \n{"text": "two\\n\\nparas"}\n')
    assert load_dataset_texts(path) == ["one", "two\n\nparas"]
    assert validate_dataset(path) == {"documents": 2, "characters": 13, "bytes": path.stat().st_size}


def test_plain_text_documents_are_separated_by_blank_lines(tmp_path):
    path = _file(tmp_path, "d.txt", "First doc\nstill first\n\n\n  \nSecond doc\r\n")
    assert load_dataset_texts(path) == ["First doc\nstill first", "Second doc"]


@pytest.mark.parametrize("lines, message", [
    (['{"text": "a"}', '{"text": "b"}', '{"text": "c"'], "line 3: not valid JSON"),
    (['{"text": "a"}', '{"txt": "b"}'], 'line 2: the object has no "text" field'),
    (['["text"]'], "line 1: expected an object"),
    (['{"text": "a"}', '{"text": 5}'], 'line 2: "text" must be a string, got int'),
    (['{"text": "a"}', '', '{"text": "  "}'], 'line 3: "text" is empty'),
])
def test_malformed_jsonl_names_the_line(tmp_path, lines, message):
    with pytest.raises(DatasetError, match=message):
        load_dataset_texts(_file(tmp_path, "d.jsonl", "\n".join(lines) + "\n"))


def test_an_empty_dataset_is_refused(tmp_path):
    for name, content in [("e.jsonl", ""), ("e.txt", "\n  \n\n")]:
        with pytest.raises(DatasetError, match="empty"):
            load_dataset_texts(_file(tmp_path, name, content))
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset_texts(tmp_path / "missing.jsonl")


def test_non_utf8_bytes_are_refused_with_their_line(tmp_path):
    for name, content in [("b.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n'), ("b.txt", b"ok\n\ncaf\xe9\n")]:
        with pytest.raises(DatasetError, match=r"line (2|3) is not valid UTF-8"):
            load_dataset_texts(_file(tmp_path, name, content))


def test_documents_stream_before_a_later_bad_line_is_read(tmp_path):
    path = _file(tmp_path, "d.jsonl", '{"text": "first"}\n' + "not json\n")
    it = iter_dataset_texts(path)
    assert next(it) == "first"  # the broken second line has not been parsed yet
    with pytest.raises(DatasetError, match="line 2"):
        next(it)


def test_dataset_digest_is_the_sha256_of_the_bytes(tmp_path):
    path = _file(tmp_path, "d.jsonl", b'{"text": "x"}\n' * 100_000)
    assert dataset_digest(path) == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    other = _file(tmp_path, "e.jsonl", b'{"text": "y"}\n')
    assert dataset_digest(other) != dataset_digest(path)


# ---- config ---------------------------------------------------------------------------------------

def test_config_from_dict_accepts_known_keys_and_fills_defaults():
    cfg = FinetuneConfig.from_dict({"epochs": 2, "learning_rate": 5e-4, "lora": True, "max_steps": None})
    assert cfg.epochs == 2.0 and isinstance(cfg.epochs, float) and cfg.lora and cfg.max_steps is None
    assert cfg.batch_size == FinetuneConfig().batch_size
    assert FinetuneConfig.from_dict(cfg.to_dict()) == cfg


def test_config_refuses_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown fine-tuning option\(s\) \['lr'\]"):
        FinetuneConfig.from_dict({"lr": 0.1})


@pytest.mark.parametrize("key, value, message", [
    ("learning_rate", 0, r"learning_rate must be in \(0, 1\]"),
    ("learning_rate", 2.0, r"learning_rate must be in \(0, 1\]"),
    ("batch_size", 0, r"batch_size must be in \[1, 1024\]"),
    ("batch_size", 2048, r"batch_size must be in \[1, 1024\]"),
    ("batch_size", 8.0, "batch_size must be an integer"),
    ("batch_size", True, "batch_size must be an integer"),
    ("epochs", 0, r"epochs must be in \(0, 100\]"),
    ("epochs", float("nan"), "epochs must be a number"),
    ("val_fraction", 0.9, r"val_fraction must be in \[0, 0.5\]"),
    ("eval_every", 0, "eval_every must be in"),
    ("max_seconds", -1, "max_seconds must be in"),
    ("block_size", "64", "block_size must be an integer"),
    ("lora", 1, "lora must be true or false"),
    ("seed", -1, r"seed must be in \[0, 4294967295\]"),
])
def test_config_refuses_out_of_range_values_naming_key_and_range(key, value, message):
    with pytest.raises(ValueError, match=message):
        FinetuneConfig.from_dict({key: value})
