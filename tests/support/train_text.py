"""A bare causal-LM training loop for test fixtures: a tiny model trained for a few seconds on the
project's corpus. The product trains through its fine-tuning jobs (aigc_models/finetune.py)."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TrainConfig:
    learning_rate: float = 3e-3
    batch_size: int = 16
    block_size: int = 128
    max_steps: int = 100_000
    max_seconds: float = 60.0
    eval_every: int = 25
    val_fraction: float = 0.1
    patience: int = 4  # evaluations without a better validation loss before stopping
    early_stopping: bool = True  # off: train the whole budget and keep the last weights
    warmup_steps: int = 20
    weight_decay: float = 0.01
    seed: int = 0


def _blocks(tokenizer, texts: Sequence[str], block: int) -> torch.Tensor:
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t)["input_ids"] + [tokenizer.eos_token_id])
    n = len(ids) // (block + 1)
    if n == 0:
        raise ValueError(f"corpus of {len(ids)} tokens is shorter than one block of {block + 1}")
    return torch.tensor(ids[: n * (block + 1)]).view(n, block + 1)


@torch.no_grad()
def _eval_loss(model, blocks: torch.Tensor, batch: int) -> float:
    model.eval()
    losses = []
    for i in range(0, len(blocks), batch):
        b = blocks[i : i + batch]
        losses.append(model(input_ids=b[:, :-1], labels=b[:, :-1].clone()).loss.item() * len(b))
    model.train()
    return sum(losses) / len(blocks)


def train_causal_lm(
    model, tokenizer, texts: Sequence[str], cfg: TrainConfig = TrainConfig(),
    on_eval: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train on ``texts`` with a held-out split; stop early and keep the weights of the best eval."""
    rng = random.Random(cfg.seed)
    docs = list(texts)
    rng.shuffle(docs)
    n_val = max(1, int(len(docs) * cfg.val_fraction)) if cfg.val_fraction > 0 and len(docs) > 1 else 0
    train_blocks = _blocks(tokenizer, docs[n_val:], cfg.block_size)
    val_blocks = _blocks(tokenizer, docs[:n_val], cfg.block_size) if n_val else train_blocks[:0]
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps))
    evaluate = (lambda: _eval_loss(model, val_blocks, cfg.batch_size)) if len(val_blocks) else None
    first = evaluate() if evaluate else None
    best, best_state, bad, step, loss = first or math.inf, None, 0, 0, float("nan")
    t0 = time.perf_counter()
    model.train()
    while step < cfg.max_steps and time.perf_counter() - t0 < cfg.max_seconds:
        idx = torch.randint(len(train_blocks), (cfg.batch_size,))
        b = train_blocks[idx]
        loss = model(input_ids=b[:, :-1], labels=b[:, :-1].clone()).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        loss = loss.item()
        if evaluate and step % cfg.eval_every == 0:
            val = evaluate()
            if on_eval:
                on_eval({"step": step, "loss": loss, "eval_loss": val, "lr": sched.get_last_lr()[0],
                         "seconds": round(time.perf_counter() - t0, 2)})
            if val < best - 1e-4:
                best, bad = val, 0
                if cfg.early_stopping:
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad += 1
                if cfg.early_stopping and bad >= cfg.patience:
                    break
    final_eval = evaluate() if evaluate else None
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return {
        "steps": step, "seconds": round(time.perf_counter() - t0, 2), "train_loss": loss,
        "eval_loss_before": first, "eval_loss": best if cfg.early_stopping else final_eval,
        "best_eval_loss": best if evaluate else None,
        "train_tokens": int(train_blocks.numel()), "val_tokens": int(val_blocks.numel()),
    }
