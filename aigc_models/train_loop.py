"""The training loop the media fine-tuners share (images, speech): steps, events, checkpoints written
through a temporary directory, exact resume. A trainer supplies the model's loss and the batches."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
WEIGHTS_FILE = "trainable.safetensors"
STATE_FORMAT = 1


@dataclass
class Run:
    """Counters of one run: all a checkpoint needs besides the trainable weights and the optimizer."""

    cfg: Any  # ImageFinetuneConfig, SpeechFinetuneConfig: max_steps, eval_every, checkpoint_every, ...
    fingerprint: str
    examples: int
    step: int = 0
    seconds: float = 0.0
    eval_before: float | None = None
    eval_loss: float | None = None
    train_loss: float | None = None
    window_sum: float = 0.0
    window_steps: int = 0
    checkpoint: Path | None = None

    def state(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "step": self.step, "seconds": round(self.seconds, 3),
                "eval_loss_before": self.eval_before, "eval_loss": self.eval_loss, "train_loss": self.train_loss,
                "window_loss_sum": self.window_sum, "window_steps": self.window_steps,
                "records_sha256": self.fingerprint, "config": self.cfg.to_dict()}

    def restore(self, state: dict[str, Any], module, opt, ckpt: Path) -> None:
        import torch
        from safetensors.torch import load_file

        self.step, self.seconds, self.train_loss = state["step"], state["seconds"], state["train_loss"]
        self.eval_before, self.eval_loss = state["eval_loss_before"], state["eval_loss"]
        self.window_sum, self.window_steps = state["window_loss_sum"], state["window_steps"]
        saved = load_file(ckpt / WEIGHTS_FILE)
        named = _changing(module)
        if set(saved) != set(named):
            raise ValueError(f"{ckpt}: its weights do not match this model's trainable parameters")
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(saved[n])
        opt.load_state_dict(torch.load(ckpt / OPTIMIZER_FILE, map_location="cpu", weights_only=True))

    def metrics(self, reason: str) -> dict[str, Any]:
        return {"steps": self.step, "total_steps": self.cfg.max_steps, "seconds": round(self.seconds, 2),
                "train_loss": self.train_loss, "eval_loss_before": self.eval_before, "eval_loss": self.eval_loss,
                "examples": self.examples, "stop_reason": reason, "interrupted": reason == "interrupted",
                **({"lora": self.cfg.lora, "rank": self.cfg.rank if self.cfg.lora else None}
                   if hasattr(self.cfg, "lora") else {}),
                "checkpoint": str(self.checkpoint) if self.checkpoint else None}


def _changing(module) -> dict[str, Any]:
    """What training changes: the trainable parameters and every buffer (a BatchNorm's running
    statistics move in training mode, and evaluation reads them)."""
    named = {n: p for n, p in module.named_parameters() if p.requires_grad}
    named.update({f"buffer:{n}": b for n, b in module.named_buffers()})
    return named


def training_state(module) -> dict[str, Any]:
    """A CPU copy of what a checkpoint must hold of ``module`` to resume it exactly."""
    return {n: t.detach().to("cpu", copy=True).contiguous() for n, t in _changing(module).items()}


def train_loop(run: Run, m, data, opt, params, evaluation, ckpt_root: Path, on_event, on_checkpoint,
               should_stop) -> str:
    """Steps until max_steps, max_seconds or ``should_stop`` (then a checkpoint, "interrupted").
    ``m`` gives ``loss(*batch)``, ``eval_loss(evaluation)`` and ``trainable()``; ``data.batch(step)``."""
    import torch

    cfg = run.cfg
    t0, before, saved_at, reason = time.perf_counter(), run.seconds, -1, "max_steps"
    while True:
        run.seconds = before + time.perf_counter() - t0
        if run.step >= cfg.max_steps:
            break
        if cfg.max_seconds is not None and run.seconds >= cfg.max_seconds:
            reason = "max_seconds"
            break
        if should_stop is not None and should_stop():
            if saved_at != run.step:
                _checkpoint(run, m, opt, ckpt_root, on_checkpoint)
            return "interrupted"
        loss = m.loss(*data.batch(run.step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        run.step += 1
        run.window_sum += loss.item()
        run.window_steps += 1
        if run.step % cfg.eval_every == 0 or run.step == cfg.max_steps:
            _report(run, m, evaluation, on_event, before + time.perf_counter() - t0)
        if cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0 and run.step < cfg.max_steps:
            _checkpoint(run, m, opt, ckpt_root, on_checkpoint)
            saved_at = run.step
    run.seconds = before + time.perf_counter() - t0
    if run.window_steps:
        _report(run, m, evaluation, on_event, run.seconds)
    return reason


def _report(run: Run, m, evaluation, on_event, seconds: float) -> None:
    run.train_loss = run.window_sum / run.window_steps
    run.window_sum, run.window_steps = 0.0, 0
    run.eval_loss = m.eval_loss(evaluation)
    if on_event:
        on_event({"step": run.step, "total_steps": run.cfg.max_steps, "loss": round(run.train_loss, 6),
                  "eval_loss": round(run.eval_loss, 6), "lr": run.cfg.learning_rate, "seconds": round(seconds, 2)})


def _checkpoint(run: Run, m, opt, root: Path, on_checkpoint) -> Path:
    """``root/step-N`` written through a temporary directory: trainable weights, optimizer, counters."""
    import torch
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / f"step-{run.step:08d}", root / f".step-{run.step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(m.trainable(), tmp / WEIGHTS_FILE)
    torch.save(opt.state_dict(), tmp / OPTIMIZER_FILE)
    return commit_checkpoint(run, tmp, final, on_checkpoint)


def commit_checkpoint(run: Any, tmp: Path, final: Path, on_checkpoint) -> Path:
    """The last step of every trainer's checkpoint (text, image, speech): the run's counters written
    into ``tmp``, which then becomes ``final`` in one rename; older ones beyond ``keep_checkpoints``
    go; ``on_checkpoint`` uploads it."""
    state = run.state()
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    run.checkpoint = final
    if run.cfg.keep_checkpoints:
        for old in sorted(final.parent.glob("step-*"))[: -run.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    if on_checkpoint:
        on_checkpoint(final, state)
    return final


def read_state(ckpt: Path) -> dict[str, Any]:
    try:
        state = json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{ckpt} is not a fine-tuning checkpoint: {e}") from e
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{ckpt}: checkpoint format {state.get('format')!r}, expected {STATE_FORMAT}")
    return state


def check_resumable(state: dict[str, Any], cfg: Any, fingerprint: str, keys: Sequence[str]) -> None:
    for key in keys:
        if state["config"].get(key) != getattr(cfg, key):
            raise ValueError(f"cannot resume: the checkpoint was trained with {key}={state['config'].get(key)!r}, "
                             f"this run asks for {getattr(cfg, key)!r}")
    if state["records_sha256"] != fingerprint:
        raise ValueError("cannot resume: the dataset differs from the one the checkpoint was trained on")


def records_sha256(records: Sequence[Any]) -> str:
    """The dataset's (file name, text) records in order: a checkpoint resumes only on the same."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.file_name, r.text]).encode() + b"\n")
    return h.hexdigest()
