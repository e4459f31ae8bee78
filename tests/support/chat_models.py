"""Tiny chat checkpoints for the text backend's tests: a GPT-2 with ChatML tokens and template, whose
generation_config.json lists two EOS ids and sampling defaults, saved with save_pretrained.

Its output does not depend on the context (the final layer norm's weight is zero, so every position
ends in the same hidden state: its bias). The next-token distribution is then fixed and set by hand:
``<|im_end|>`` has logit ``eos_logit``, every other token 0, ``<|endoftext|>`` -30. So an item ends
at ``<|im_end|>`` (a listed EOS that is not the tokenizer's own) after a few sampled tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# What the checkpoint's generation_config.json says (Qwen2-Instruct's values).
CHECKPOINT_SAMPLING = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, "do_sample": True}


def build_chat_model(out: Path, *, template: bool = True, pad_vocab_to: int | None = None,
                     eos_logit: float = 3.0, padded_logit: float = 8.0) -> Path:
    """ChatML GPT-2; ``pad_vocab_to`` rounds the embedding matrix past the tokenizer (as NeoX and Qwen2
    checkpoints do) and gives those rows logit ``padded_logit``, so unmasked they would be drawn."""
    import torch
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    from aigc_models.tiny_text import EOS, train_tokenizer
    from tests.support.models import corpus_texts

    tok = train_tokenizer(corpus_texts(40), vocab_size=400)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    if template:
        tok.chat_template = CHATML
    n_tok = len(tok)
    vocab = pad_vocab_to or n_tok
    eot, im_end = tok.convert_tokens_to_ids(EOS), tok.convert_tokens_to_ids("<|im_end|>")
    config = GPT2Config(vocab_size=vocab, n_positions=256, n_embd=16, n_layer=1, n_head=2,
                        bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0  # every position's hidden state: e_0
        wte = model.transformer.wte.weight  # tied to lm_head: logits are column 0
        wte[:, 0] = 0.0
        wte[im_end, 0] = eos_logit
        wte[eot, 0] = -30.0
        if vocab > n_tok:
            wte[n_tok:, 0] = padded_logit
    model.generation_config = GenerationConfig(
        eos_token_id=[im_end, eot], pad_token_id=eot, bos_token_id=eot, **CHECKPOINT_SAMPLING)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def checkpoint_files(path: Path) -> dict[str, object]:
    """What the saved checkpoint says, read back as a test would check it."""
    return json.loads((path / "generation_config.json").read_text())
