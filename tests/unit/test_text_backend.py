"""The transformers text backend on a tiny GPT-2 saved with save_pretrained."""

from __future__ import annotations

import pytest

from aigc_models import GenRequest, load_backend
from aigc_models.base import BackendError

SAMPLED = {"max_new_tokens": 12, "temperature": 0.9, "top_p": 0.95, "top_k": 50}


@pytest.fixture(scope="module")
def gen(tiny_text_model):
    return load_backend("hf-causal-lm", tiny_text_model, device="cpu")


def _texts(outs):
    return [o.data.decode() for o in outs]


PROMPTS = ["Headline: Council approves budget\n\n", "Hi", "Headline: Storm closes the harbour road for a day\n\n"]


def test_an_item_generates_the_same_text_alone_as_in_a_batch(gen):
    reqs = [GenRequest(i, p, SAMPLED, seed=100 + i) for i, p in enumerate(PROMPTS)]
    batched = _texts(gen.generate(reqs))
    alone = [_texts(gen.generate([r]))[0] for r in reqs]
    assert batched == alone
    assert all(o.info["batch_size"] == 3 for o in gen.generate(reqs))


def test_the_seed_decides_the_sample(gen):
    a = _texts(gen.generate([GenRequest(0, PROMPTS[0], SAMPLED, seed=1)]))
    b = _texts(gen.generate([GenRequest(0, PROMPTS[0], SAMPLED, seed=1)]))
    c = [_texts(gen.generate([GenRequest(0, PROMPTS[0], SAMPLED, seed=s)]))[0] for s in range(2, 7)]
    assert a == b
    assert any(t != a[0] for t in c)


def test_greedy_ignores_the_seed(gen):
    greedy = {"max_new_tokens": 10, "temperature": 0}
    outs = {_texts(gen.generate([GenRequest(0, PROMPTS[0], greedy, seed=s)]))[0] for s in range(3)}
    assert len(outs) == 1


def test_eos_off_gives_exact_token_counts(gen):
    p = {"max_new_tokens": 17, "temperature": 0, "stop_at_eos": False}
    outs = gen.generate([GenRequest(i, pr, p, seed=i) for i, pr in enumerate(PROMPTS)])
    assert [o.info["new_tokens"] for o in outs] == [17, 17, 17]
    assert {o.info["finish_reason"] for o in outs} == {"length"}


def test_mixed_params_run_in_their_own_groups_and_keep_order(gen):
    reqs = [GenRequest(0, PROMPTS[0], {"max_new_tokens": 3, "temperature": 0, "stop_at_eos": False}, 0),
            GenRequest(1, PROMPTS[1], {"max_new_tokens": 9, "temperature": 0, "stop_at_eos": False}, 1)]
    outs = gen.generate(reqs)
    assert [o.info["new_tokens"] for o in outs] == [3, 9]


def test_echo_puts_the_prompt_in_front(gen):
    out = gen.generate([GenRequest(0, PROMPTS[0], {"max_new_tokens": 4, "echo": True}, 0)])[0]
    assert out.data.decode().startswith(PROMPTS[0])
    assert out.media_type.startswith("text/plain")


def test_a_prompt_past_the_context_is_an_error(gen):
    with pytest.raises(BackendError, match="context"):
        gen.generate([GenRequest(0, "word " * 300, {"max_new_tokens": 8}, 0)])


def test_a_directory_without_a_model_is_a_load_error(tmp_path):
    with pytest.raises(BackendError, match="cannot load"):
        load_backend("hf-causal-lm", tmp_path, device="cpu")


def test_an_unknown_backend_is_named(tmp_path):
    with pytest.raises(BackendError, match="unknown backend 'nope'"):
        load_backend("nope", tmp_path, device="cpu")
