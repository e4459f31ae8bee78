"""Checkpoint-faithful text generation: listed EOS ids, padded vocabularies, stop strings, the
precedence of parameters and chat rendering, on tiny checkpoints saved with save_pretrained."""

from __future__ import annotations

import hashlib

import pytest

from aigc_core.registry import ModelRef, checkpoint_chat_template
from aigc_models import GenRequest, load_backend
from aigc_models.base import BackendError
from tests.support.chat_models import CHATML, CHECKPOINT_SAMPLING, build_chat_model
from worker.chunk import Claimed, JobInfo
from worker.chunk import requests_of as _requests

MESSAGES = [{"role": "system", "content": "You write headlines."},
            {"role": "user", "content": "Storm closes the harbour road"}]


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory, one_torch_thread):
    return build_chat_model(tmp_path_factory.mktemp("models") / "chatml")


@pytest.fixture(scope="module")
def chat(chat_dir):
    return load_backend("hf-causal-lm", chat_dir, device="cpu")


@pytest.fixture(scope="module")
def padded(tmp_path_factory, one_torch_thread):
    path = build_chat_model(tmp_path_factory.mktemp("models") / "padded", pad_vocab_to=512)
    return load_backend("hf-causal-lm", path, device="cpu")


@pytest.fixture(scope="module")
def gpt2(tiny_text_model, one_torch_thread):
    return load_backend("hf-causal-lm", tiny_text_model, device="cpu")


def _one(gen, params, seed=1, prompt="", messages=None, **kw):
    return gen.generate([GenRequest(0, prompt, params, seed, messages=messages, **kw)])[0]


# ---- every EOS id the checkpoint lists --------------------------------------------------------------

def test_the_checkpoint_lists_two_eos_ids_and_the_tokenizers_own_is_the_other(chat):
    im_end = chat.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert chat.eos_ids == [im_end, chat.tokenizer.eos_token_id] and im_end != chat.tokenizer.eos_token_id


def test_an_item_that_samples_a_listed_eos_stops_there_with_finish_reason_stop(chat):
    # <|im_end|> is in generation_config.json's list, not the tokenizer's EOS: the old backend ran on.
    out = _one(chat, {"max_new_tokens": 40}, seed=1, messages=MESSAGES)
    assert out.info["finish_reason"] == "stop"
    assert 0 < out.info["new_tokens"] < 40
    # About one token in eight is <|im_end|> (see tests/support/chat_models.py): every seed stops early.
    outs = [_one(chat, {"max_new_tokens": 40}, seed=s, messages=MESSAGES) for s in range(2, 8)]
    assert {o.info["finish_reason"] for o in outs} == {"stop"}


def test_the_stopped_item_ends_exactly_at_the_eos_token(chat):
    out = _one(chat, {"max_new_tokens": 40}, seed=1, messages=MESSAGES)
    prompt = chat.render(GenRequest(0, "", {}, 1, messages=MESSAGES))[0]
    enc = chat.tokenizer([prompt], return_tensors="pt", add_special_tokens=False)
    params = chat.effective(GenRequest(0, "", {"max_new_tokens": 40}, 1))[0]
    ids = chat._forward(enc, params, [1])[0].tolist()
    n = out.info["new_tokens"]
    assert ids[n] == chat.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert out.data.decode() == chat.tokenizer.decode(ids[:n], skip_special_tokens=True)


def test_eos_off_runs_to_the_length(chat):
    out = _one(chat, {"max_new_tokens": 25, "stop_at_eos": False}, messages=MESSAGES)
    assert out.info["finish_reason"] == "length" and out.info["new_tokens"] == 25


# ---- padded vocabularies -------------------------------------------------------------------------

def test_ids_past_the_tokenizer_are_never_drawn_greedy_or_sampled(padded):
    n_tok = len(padded.tokenizer)
    assert padded.model.config.vocab_size == 512 > n_tok
    enc = padded.tokenizer(["Headline: Council"], return_tensors="pt")
    for params in ({"temperature": 0}, {"temperature": 1.0, "top_p": 1.0, "top_k": 0}, {}):
        eff = padded.effective(GenRequest(0, "", {**params, "max_new_tokens": 48, "stop_at_eos": False}, 0))[0]
        for seed in range(3):
            ids = padded._forward(enc, eff, [seed])[0].tolist()
            assert len(ids) == 48 and max(ids) < n_tok, ids


def test_new_tokens_counts_real_tokens_on_a_padded_vocabulary(padded):
    out = _one(padded, {"max_new_tokens": 30, "stop_at_eos": False}, prompt="Hello", seed=3)
    assert out.info["new_tokens"] == 30
    # Every one of them is a token with text: re-encoding the output gives text back, not ''.
    assert len(out.data.decode()) >= 30


# ---- stop strings --------------------------------------------------------------------------------

SAMPLED = {"max_new_tokens": 30, "temperature": 1.0, "stop_at_eos": False}
PROMPTS = ["Headline: Council approves budget\n\n", "Headline: Storm closes the harbour road\n\n"]


def _stop_string(text: str, avoid: str = "") -> str:
    """Four characters from the middle of ``text`` that are not all blank and not in ``avoid``."""
    return next(text[k : k + 4] for k in range(10, len(text) - 4)
                if text[k : k + 4].strip() and text[k : k + 4] not in avoid)


def test_a_stop_string_cuts_the_output_before_it_and_says_stop(gpt2):
    full = _one(gpt2, SAMPLED, prompt=PROMPTS[0]).data.decode()
    stop = _stop_string(full)
    at = full.find(stop)
    out = _one(gpt2, {**SAMPLED, "stop": [stop]}, prompt=PROMPTS[0])
    assert out.data.decode() == full[:at]
    assert out.info["finish_reason"] == "stop" and out.info["new_tokens"] < 30
    assert out.info["params"]["stop"] == [stop] and out.info["param_sources"]["stop"] == "job"
    # Generation itself ended there, not only the text: no tokens were made past the stop string.
    enc = gpt2.tokenizer([PROMPTS[0]], return_tensors="pt")
    eff = gpt2.effective(GenRequest(0, "", {**SAMPLED, "stop": [stop]}, 1))[0]
    assert gpt2._forward(enc, eff, [1]).shape[1] == out.info["new_tokens"] < 30


def test_one_stop_string_given_as_text_is_a_string_not_its_characters(gpt2):
    full = _one(gpt2, SAMPLED, prompt=PROMPTS[0]).data.decode()
    stop = _stop_string(full)
    out = _one(gpt2, {**SAMPLED, "stop": stop}, prompt=PROMPTS[0])
    assert out.data.decode() == full[: full.find(stop)] and out.info["params"]["stop"] == [stop]


def test_a_stop_string_ends_only_its_own_item_in_a_batch(gpt2):
    full = [_one(gpt2, SAMPLED, prompt=p, seed=i).data.decode() for i, p in enumerate(PROMPTS)]
    stop = _stop_string(full[0], avoid=full[1])
    params = {**SAMPLED, "stop": ["never-there", stop]}
    outs = gpt2.generate([GenRequest(i, p, params, i) for i, p in enumerate(PROMPTS)])
    assert outs[0].data.decode() == full[0][: full[0].find(stop)] and outs[0].info["finish_reason"] == "stop"
    assert outs[1].data.decode() == full[1] and outs[1].info["finish_reason"] == "length"
    assert outs[1].info["new_tokens"] == 30


# ---- precedence: item > job > registry > checkpoint > project defaults ------------------------------

def test_the_checkpoints_sampling_defaults_run_when_the_job_sets_none(chat):
    out = _one(chat, {"max_new_tokens": 20}, messages=MESSAGES)
    for k, v in CHECKPOINT_SAMPLING.items():
        assert out.info["params"][k] == v and out.info["param_sources"][k] == "checkpoint"
    assert out.info["param_sources"]["max_new_tokens"] == "job"
    assert out.info["param_sources"]["echo"] == "default" and out.info["params"]["echo"] is False
    # They are what ran: the same as setting them explicitly, not as the project defaults.
    texts = {s: _one(chat, {"max_new_tokens": 20, "stop_at_eos": False}, seed=s, prompt="Hi").data
             for s in range(4)}
    same = {s: _one(chat, {"max_new_tokens": 20, "stop_at_eos": False, **CHECKPOINT_SAMPLING}, seed=s, prompt="Hi").data
            for s in range(4)}
    project = {s: _one(chat, {"max_new_tokens": 20, "stop_at_eos": False, "temperature": 1.0, "top_p": 1.0,
                              "top_k": 0, "repetition_penalty": 1.0}, seed=s, prompt="Hi").data for s in range(4)}
    assert texts == same and texts != project


def test_a_job_value_wins_over_the_checkpoint(chat):
    out = _one(chat, {"max_new_tokens": 5, "temperature": 0.9, "top_k": 0}, messages=MESSAGES)
    assert out.info["params"]["temperature"] == 0.9 and out.info["param_sources"]["temperature"] == "job"
    assert out.info["params"]["top_k"] == 0 and out.info["param_sources"]["top_k"] == "job"
    assert out.info["params"]["top_p"] == 0.8 and out.info["param_sources"]["top_p"] == "checkpoint"


def test_the_worker_merges_item_over_job_over_registry_and_the_backend_fills_the_rest(chat):
    ref = ModelRef("m", 1, "text", "hf-causal-lm", "file:///x",
                   defaults={"temperature": 0.5, "top_k": 5, "top_p": 0.6, "micro_batch_size": 2})
    job = JobInfo("j", "text", {"temperature": 0.6, "top_k": 7}, ref)
    item = Claimed(1, 0, "c0", "", {"temperature": 0.9, "top_p": None}, 3, 0, messages=MESSAGES)
    (req,) = _requests(job, [item])
    assert req.params == {"temperature": 0.9, "top_k": 7, "top_p": 0.6}  # a None sets nothing
    assert req.sources == {"temperature": "item", "top_k": "job", "top_p": "registry"}
    assert req.messages == MESSAGES
    params, sources = chat.effective(req)
    assert sources == {"temperature": "item", "top_k": "job", "top_p": "registry",
                       "repetition_penalty": "checkpoint", "do_sample": "checkpoint",
                       "max_new_tokens": "default", "stop_at_eos": "default", "echo": "default", "stop": "default"}
    assert params["repetition_penalty"] == 1.05 and params["max_new_tokens"] == 128


def test_a_checkpoint_without_generation_config_takes_the_project_defaults(gpt2):
    out = _one(gpt2, {"max_new_tokens": 3}, prompt=PROMPTS[0])
    assert {k: out.info["param_sources"][k] for k in CHECKPOINT_SAMPLING} == dict.fromkeys(CHECKPOINT_SAMPLING,
                                                                                          "default")
    assert out.info["params"]["temperature"] == 1.0 and out.info["params"]["top_p"] == 1.0


# ---- chat rendering ------------------------------------------------------------------------------

def test_messages_are_rendered_by_the_checkpoints_template_with_a_generation_prompt(chat):
    prompt, template = chat.render(GenRequest(0, "", {}, 0, messages=MESSAGES))
    assert prompt == ("<|im_start|>system\nYou write headlines.<|im_end|>\n"
                      "<|im_start|>user\nStorm closes the harbour road<|im_end|>\n<|im_start|>assistant\n")
    assert template == CHATML
    out = _one(chat, {"max_new_tokens": 4}, messages=MESSAGES)
    assert out.info["prompt_sha256"] == hashlib.sha256(prompt.encode()).hexdigest()
    assert out.info["chat_template_sha256"] == hashlib.sha256(CHATML.encode()).hexdigest()
    # The template's special tokens are single tokens, with no BOS added in front.
    ids = chat.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert out.info["prompt_tokens"] == len(ids) and ids[0] == chat.tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_a_registry_template_is_used_for_a_model_without_one(gpt2):
    with pytest.raises(BackendError, match="no chat template"):
        _one(gpt2, {"max_new_tokens": 2}, messages=MESSAGES)
    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    out = _one(gpt2, {"max_new_tokens": 2, "echo": True}, messages=MESSAGES, chat_template=plain)
    assert out.data.decode().startswith("system: You write headlines.\nuser: Storm closes the harbour road\n"
                                        "assistant:")
    assert out.info["chat_template_sha256"] == hashlib.sha256(plain.encode()).hexdigest()


def test_chat_and_prompt_items_in_one_call_keep_their_order(chat):
    reqs = [GenRequest(0, "Hello", {"max_new_tokens": 3}, 0), GenRequest(1, "", {"max_new_tokens": 3}, 1,
                                                                        messages=MESSAGES)]
    outs = chat.generate(reqs)
    assert "chat_template_sha256" not in outs[0].info and "chat_template_sha256" in outs[1].info


def test_the_template_is_read_without_transformers_from_either_place(chat_dir, tmp_path):
    assert checkpoint_chat_template(chat_dir) == CHATML  # chat_template.jinja, as transformers 5 saves it
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    assert checkpoint_chat_template(tmp_path) == "{{ messages }}"
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": [{"name": "default", "template": "T"}]}')
    assert checkpoint_chat_template(tmp_path) == "T"
    (tmp_path / "tokenizer_config.json").write_text('{"model_max_length": 8}')
    assert checkpoint_chat_template(tmp_path) is None
