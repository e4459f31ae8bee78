"""Tiny real models saved with save_pretrained, loaded through the same code as a real checkpoint."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path


def corpus_texts(n: int | None = None) -> list[str]:
    raw = resources.files("aigc_models").joinpath("data/news_corpus.jsonl").read_text(encoding="utf-8")
    docs = [json.loads(line) for line in raw.splitlines() if line.strip()][:n]
    return [f"Headline: {d['headline']}\n\n{d['body']}" for d in docs]


def build_tiny_text_model(out: Path, *, n_layer: int = 2, n_embd: int = 32, train_seconds: float = 0.0) -> Path:
    """A byte-level BPE tokenizer and a 2-layer GPT-2, optionally trained for a few seconds."""
    from aigc_models.train_text import TrainConfig, save, tiny_gpt2, train_causal_lm, train_tokenizer

    texts = corpus_texts()
    tok = train_tokenizer(texts, vocab_size=512)
    model = tiny_gpt2(tok, n_layer=n_layer, n_embd=n_embd, n_head=2, n_positions=256)
    if train_seconds:
        train_causal_lm(model, tok, texts, TrainConfig(max_seconds=train_seconds, early_stopping=False,
                                                       eval_every=10_000, block_size=64))
    return save(model, tok, out)
