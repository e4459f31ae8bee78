"""Fine-tuning a causal LM on a text dataset: validation split, best-eval weights, exact resume, LoRA.

Datasets, digests and the config need no torch: the heavy imports happen inside the training code.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from aigc_models.train_loop import OPTIMIZER_FILE, STATE_FORMAT, commit_checkpoint, read_state

JSONL_SUFFIXES = (".jsonl", ".ndjson")
MAX_LINE_BYTES = 64 << 20  # one line (one JSONL document) at most; guards against a file with no newlines
BEST_FILE = "best.safetensors"
# Keys that decide the data order or the model's shape: a checkpoint resumes only under the same values.
RESUME_KEYS = ("seed", "block_size", "batch_size", "val_fraction", "lora", "lora_r", "lora_alpha")


class DatasetError(ValueError):
    """A fine-tuning dataset that cannot be used; the message names the line where there is one."""


# ---- datasets -------------------------------------------------------------------------------------

def iter_dataset_texts(path: Path) -> Iterator[str]:
    """Stream documents from ``path``, one line in memory at a time.

    ``.jsonl``/``.ndjson``: one ``{"text": "..."}`` object per line; other keys are ignored, blank
    lines skipped. Any other file is plain UTF-8 text in which documents are separated by one or
    more blank (whitespace-only) lines; a document keeps its inner line breaks. Multi-paragraph
    documents therefore need JSONL.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset {path} does not exist or is not a file")
    lines = _utf8_lines(path)
    docs = _jsonl_docs(lines, path.name) if path.suffix.lower() in JSONL_SUFFIXES else _plain_docs(lines)
    count = 0
    for doc in docs:
        count += 1
        yield doc
    if count == 0:
        raise DatasetError(f"dataset {path.name} is empty: it holds no documents")


def load_dataset_texts(path: Path) -> list[str]:
    """All documents of a dataset file (see ``iter_dataset_texts`` for the formats)."""
    return list(iter_dataset_texts(path))


def validate_dataset(path: Path) -> dict[str, int]:
    """Check a dataset without holding it in memory: number of documents and characters."""
    docs = chars = 0
    for text in iter_dataset_texts(path):
        docs += 1
        chars += len(text)
    return {"documents": docs, "characters": chars, "bytes": Path(path).stat().st_size}


def dataset_digest(path: Path) -> str:
    """``sha256:<hex>`` of the file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"sha256:{h.hexdigest()}"


def _utf8_lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open("rb") as f:
        for no in range(1, 1 << 62):
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            if len(raw) > MAX_LINE_BYTES:
                raise DatasetError(f"{path.name} line {no} is longer than {MAX_LINE_BYTES >> 20} MiB")
            if no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark, as some editors write
            try:
                yield no, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise DatasetError(f"{path.name} line {no} is not valid UTF-8 (byte {e.start} of the line): "
                                   "datasets must be UTF-8 text") from None


def _jsonl_docs(lines: Iterator[tuple[int, str]], name: str) -> Iterator[str]:
    for no, line in lines:
        if not line.strip():
            continue
        where = f"{name} line {no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DatasetError(f'{where}: expected an object like {{"text": "..."}}, got {type(obj).__name__}')
        if "text" not in obj:
            raise DatasetError(f'{where}: the object has no "text" field (its keys: {sorted(obj)[:8]})')
        text = obj["text"]
        if not isinstance(text, str):
            raise DatasetError(f'{where}: "text" must be a string, got {type(text).__name__}')
        if not text.strip():
            raise DatasetError(f'{where}: "text" is empty')
        yield text


def _plain_docs(lines: Iterator[tuple[int, str]]) -> Iterator[str]:
    doc: list[str] = []
    for _, line in lines:
        if line.strip():
            doc.append(line)
        elif doc:
            yield "\n".join(doc)
            doc = []
    if doc:
        yield "\n".join(doc)


# ---- configuration --------------------------------------------------------------------------------

# key: (type, low, high, low excluded, None allowed); the high end is always included.
_RULES: dict[str, tuple[type, float, float, bool, bool]] = {
    "epochs": (float, 0, 100, True, False),
    "learning_rate": (float, 0, 1, True, False),
    "batch_size": (int, 1, 1024, False, False),
    "block_size": (int, 8, 8192, False, False),
    "val_fraction": (float, 0, 0.5, False, False),
    "eval_every": (int, 1, 1_000_000, False, False),
    "patience": (int, 0, 1000, False, False),
    "max_steps": (int, 1, 10_000_000, False, True),
    "max_seconds": (float, 0, 30 * 86400, True, True),
    "warmup_steps": (int, 0, 1_000_000, False, False),
    "weight_decay": (float, 0, 1, False, False),
    "seed": (int, 0, 2**32 - 1, False, False),
    "lora": (bool, 0, 1, False, False),
    "keep_best": (bool, 0, 1, False, False),
    "lora_r": (int, 1, 1024, False, False),
    "lora_alpha": (int, 1, 4096, False, False),
    "checkpoint_every": (int, 0, 10_000_000, False, False),
    "keep_checkpoints": (int, 0, 1000, False, False),
}


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyperparameters of one fine-tuning run; construction validates them."""

    epochs: float = 3.0  # passes over the training split; fractions allowed; ignored when max_steps is set
    learning_rate: float = 1e-4  # peak, after warmup; then linear decay to 0 at the planned last step
    batch_size: int = 8
    block_size: int = 128  # tokens per training sequence; at most the model's context
    val_fraction: float = 0.1  # share of documents held out; 0: no validation, no early stopping
    eval_every: int = 50  # steps between evaluations and progress events
    patience: int = 3  # evaluations without improvement before stopping; 0: never stop early
    max_steps: int | None = None  # set: exactly this many steps, whatever epochs says; None: the epochs decide
    max_seconds: float | None = 3600.0  # training time over all resumed segments; None: no limit
    warmup_steps: int = 10
    weight_decay: float = 0.01
    seed: int = 0
    lora: bool = False
    keep_best: bool = True  # False: the last weights are the result (eval loss is still reported)
    lora_r: int = 8
    lora_alpha: int = 16
    checkpoint_every: int = 200  # steps; 0: only when asked to stop
    keep_checkpoints: int = 2  # newest checkpoint directories kept; 0: keep all

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, _checked(f.name, getattr(self, f.name)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FinetuneConfig:
        """Build from JSON-like options; unknown keys and out-of-range values raise ``ValueError``."""
        if not isinstance(d, Mapping):
            raise ValueError(f"fine-tuning options must be a mapping, got {type(d).__name__}")
        unknown = sorted(set(d) - set(_RULES))
        if unknown:
            raise ValueError(f"unknown fine-tuning option(s) {unknown}; allowed: {sorted(_RULES)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _checked(key: str, value: Any) -> Any:
    kind, lo, hi, lo_open, nullable = _RULES[key]
    if value is None and nullable:
        return None
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value
    is_num = isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int and not (isinstance(value, int) and not isinstance(value, bool)):
        raise ValueError(f"{key} must be an integer in {_range(key)}, got {value!r}")
    if kind is float and not (is_num and math.isfinite(value)):
        raise ValueError(f"{key} must be a number in {_range(key)}, got {value!r}")
    if (value <= lo if lo_open else value < lo) or value > hi:
        raise ValueError(f"{key} must be in {_range(key)}, got {value!r}")
    return kind(value)


def _range(key: str) -> str:
    _, lo, hi, lo_open, nullable = _RULES[key]
    return f"{'(' if lo_open else '['}{_num(lo)}, {_num(hi)}]" + (" or null" if nullable else "")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


# ---- data -----------------------------------------------------------------------------------------

def split_train_val(texts: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Documents shuffled by ``seed``; the first ``val_fraction`` of them (at least one) held out."""
    docs = list(texts)
    random.Random(seed).shuffle(docs)
    n_val = max(1, round(len(docs) * val_fraction)) if val_fraction > 0 and len(docs) > 1 else 0
    return docs[n_val:], docs[:n_val]


def _token_blocks(tokenizer, texts: Sequence[str], block: int, *, allow_short: bool = False):
    """Documents joined with EOS and cut into rows of ``block`` tokens; the tail is dropped."""
    import torch

    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for i in range(0, len(texts), 256):
        for row in tokenizer(list(texts[i : i + 256]))["input_ids"]:
            ids.extend(row + eos)
    n = len(ids) // block
    if n == 0:
        if allow_short and len(ids) >= 2:
            return torch.tensor(ids).view(1, -1)
        raise DatasetError(f"{len(texts)} document(s) make {len(ids)} tokens, fewer than one block of {block}")
    return torch.tensor(ids[: n * block]).view(n, block)


def _texts_sha256(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()


def _evaluate(model, blocks, batch: int, device: str) -> float:
    """Mean next-token loss per predicted token over ``blocks``."""
    import torch

    model.eval()
    total = count = 0.0
    with torch.no_grad(), _autocast(device):
        for i in range(0, len(blocks), batch):
            b = blocks[i : i + batch].to(device)
            n = b.numel() - len(b)  # the first token of each row is not predicted
            total += model(input_ids=b, labels=b).loss.float().item() * n
            count += n
    model.train()
    return total / count


def _autocast(device: str):
    import torch

    on_gpu = device.startswith("cuda") and torch.cuda.is_bf16_supported()
    return torch.autocast("cuda" if on_gpu else "cpu", dtype=torch.bfloat16, enabled=on_gpu)


# ---- training -------------------------------------------------------------------------------------

def finetune_causal_lm(
    base_dir: Path | str, texts: Sequence[str], out_dir: Path, cfg: FinetuneConfig, *,
    resume_from: Path | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    on_checkpoint: Callable[[Path, dict[str, Any]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    checkpoint_dir: Path | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Fine-tune the model in ``base_dir`` on ``texts``; write the best-eval weights to ``out_dir``.

    ``should_stop`` is called before every step (keep it cheap): when it answers true the run writes
    a checkpoint and returns with ``interrupted`` set, writing no model. Checkpoints go to
    ``checkpoint_dir`` (default ``out_dir/checkpoints``) as ``step-00000123/``.
    """
    import torch

    from aigc_models.device import resolve_device

    if not texts:
        raise DatasetError("no documents to fine-tune on")
    if cfg.lora:
        _peft()  # fail before loading anything
    device = resolve_device(device)
    out_dir, base_dir = Path(out_dir), Path(base_dir)
    ckpt_root = Path(checkpoint_dir) if checkpoint_dir else out_dir / "checkpoints"
    state = read_state(Path(resume_from)) if resume_from else None
    fingerprint = _texts_sha256(texts)
    if state:
        _check_resumable(state, cfg, fingerprint)

    gpus = [torch.device(device).index or 0] if device.startswith("cuda") else []
    with torch.random.fork_rng(devices=gpus):  # the caller's random state is left as it was
        torch.manual_seed(cfg.seed)  # LoRA's initial weights, then dropout
        tokenizer, model = _load(base_dir, cfg, resume_from, device)
        run, train, val = _prepare(cfg, tokenizer, texts, fingerprint)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(
            [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],  # none on biases, norms
            lr=cfg.learning_rate)
        if state:
            assert resume_from is not None  # state is read from resume_from, and only when it is given
            run.restore(state, model, opt, Path(resume_from), device)
        else:
            run.eval_before = run.best = _evaluate(model, val, cfg.batch_size, device) if val is not None else None
        reason = _train_loop(run, model, opt, params, train, val, device, ckpt_root, tokenizer,
                             on_event, on_checkpoint, should_stop)
    metrics = run.metrics(reason)
    if reason != "interrupted":
        _save_final(run, model, tokenizer, base_dir, out_dir, metrics)
    return metrics


def _prepare(cfg: FinetuneConfig, tokenizer, texts: Sequence[str], fingerprint: str):
    """Token blocks of the two splits and the run's counters, with the planned number of steps."""
    train_docs, val_docs = split_train_val(texts, cfg.val_fraction, cfg.seed)
    train = _token_blocks(tokenizer, train_docs, cfg.block_size)
    val = _token_blocks(tokenizer, val_docs, cfg.block_size, allow_short=True) if val_docs else None
    per_epoch = max(1, len(train) // cfg.batch_size)
    # As transformers' TrainingArguments: max_steps, when set, is the plan and overrides epochs; the
    # loop goes round the training split (a fresh order each pass) as often as it takes.
    total = cfg.max_steps if cfg.max_steps else math.ceil(cfg.epochs * per_epoch)
    run = _Run(cfg=cfg, total=total, per_epoch=per_epoch,
               fingerprint=fingerprint, train_tokens=int(train.numel()),
               val_tokens=int(val.numel()) if val is not None else 0)
    return run, train, val


def _load(base_dir: Path, cfg: FinetuneConfig, resume_from: Path | None, device: str):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()  # as the text backend: the worker logs its own events
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    src = resume_from if resume_from and not cfg.lora else base_dir
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, use_safetensors=True)
    context = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if context and cfg.block_size > context:
        raise ValueError(f"block_size {cfg.block_size} is longer than the model's context of {context} tokens")
    if cfg.lora:
        peft = _peft()
        targets = ["c_attn"] if model.config.model_type == "gpt2" else None  # None: peft's table per architecture
        lora = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=targets,
                               fan_in_fan_out=model.config.model_type == "gpt2", task_type="CAUSAL_LM")
        with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
            warnings.simplefilter("ignore", FutureWarning)
            model = peft.get_peft_model(model, lora)
        if resume_from:
            from safetensors.torch import load_file

            peft.set_peft_model_state_dict(model, load_file(Path(resume_from) / "adapter_model.safetensors"))
    return tokenizer, model.to(device).train()  # type: ignore[arg-type]  # @wraps'd .to: typeshed's _Wrapped keeps self


def _peft():
    try:
        import peft
    except ImportError as e:
        raise ImportError("LoRA fine-tuning (lora: true) needs the 'peft' package, which is not installed: "
                          "pip install 'peft>=0.21,<0.22', or fine-tune without lora") from e
    return peft


def _lr(cfg: FinetuneConfig, step: int, total: int) -> float:
    """Linear warmup over ``warmup_steps``, then linear decay to zero at the planned last step."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    return cfg.learning_rate * max(0.0, (total - step) / max(1, total - cfg.warmup_steps))


@dataclass
class _Run:
    """Counters of one run: all that a checkpoint needs besides weights and optimizer moments."""

    cfg: FinetuneConfig
    total: int
    per_epoch: int
    fingerprint: str
    train_tokens: int
    val_tokens: int
    step: int = 0
    seconds: float = 0.0
    eval_before: float | None = None
    best: float | None = None
    best_step: int = 0
    best_params: dict | None = None  # trainable weights at best_step; None when best_step == 0 or now
    bad_evals: int = 0
    window_sum: float = 0.0
    window_steps: int = 0
    train_loss: float | None = None
    last_eval: float | None = None
    checkpoint: Path | None = None

    def state(self) -> dict[str, Any]:
        epoch, batch = divmod(self.step, self.per_epoch)
        return {
            "format": STATE_FORMAT, "step": self.step, "epoch": self.step / self.per_epoch,
            "epoch_index": epoch, "batch_in_epoch": batch, "steps_per_epoch": self.per_epoch,
            "total_steps": self.total, "seconds": round(self.seconds, 3), "eval_loss_before": self.eval_before,
            "best_eval_loss": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals,
            "window_loss_sum": self.window_sum, "window_steps": self.window_steps,
            "train_loss": self.train_loss, "last_eval_loss": self.last_eval, "lr": _lr(self.cfg, self.step, self.total),
            "texts_sha256": self.fingerprint, "config": self.cfg.to_dict(),
        }

    def restore(self, state: dict[str, Any], model, opt, ckpt: Path, device: str) -> None:
        import torch
        from safetensors.torch import load_file

        for key in ("step", "seconds", "best_step", "bad_evals", "train_loss"):
            setattr(self, key, state[key])
        self.eval_before, self.best, self.last_eval = (
            state["eval_loss_before"], state["best_eval_loss"], state["last_eval_loss"])
        self.window_sum, self.window_steps = state["window_loss_sum"], state["window_steps"]
        if (ckpt / BEST_FILE).exists():
            self.best_params = load_file(ckpt / BEST_FILE)
        elif self.best_step == self.step and self.step > 0:
            self.best_params = _trainable_copy(model)
        extra = torch.load(ckpt / OPTIMIZER_FILE, map_location="cpu", weights_only=True)  # RNG states stay on CPU
        opt.load_state_dict(extra["optimizer"])  # moves the moments to the parameters' device
        torch.set_rng_state(extra["torch_rng"])
        if device.startswith("cuda") and "cuda_rng" in extra:
            torch.cuda.set_rng_state(extra["cuda_rng"], torch.device(device))

    def metrics(self, reason: str) -> dict[str, Any]:
        return {k: _finite(v) for k, v in {
            "steps": self.step, "total_steps": self.total, "epochs": round(self.step / self.per_epoch, 4),
            "seconds": round(self.seconds, 2), "train_loss": self.train_loss,
            "eval_loss_before": self.eval_before, "eval_loss": self.best if self.val_tokens else None,
            "final_eval_loss": self.last_eval, "best_step": self.best_step,
            "train_tokens": self.train_tokens, "val_tokens": self.val_tokens,
            "stopped_early": reason == "early_stopping", "interrupted": reason == "interrupted",
            "stop_reason": reason, "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "lora": self.cfg.lora,
        }.items()}


def _train_loop(run: _Run, model, opt, params, train, val, device, ckpt_root, tokenizer,
                on_event, on_checkpoint, should_stop) -> str:
    import torch

    cfg = run.cfg
    t0, done_before = time.perf_counter(), run.seconds
    perm_epoch, perm, reason = -1, None, "completed"
    saved_at = -1  # the step of the last checkpoint written by this call
    while True:
        run.seconds = done_before + time.perf_counter() - t0
        if run.step >= run.total:
            reason = "max_steps" if cfg.max_steps else "completed"
            break
        if cfg.max_seconds is not None and run.seconds >= cfg.max_seconds:
            reason = "max_seconds"
            break
        if should_stop is not None and should_stop():
            if saved_at != run.step:
                _checkpoint(run, model, opt, tokenizer, ckpt_root, device, on_checkpoint)
            return "interrupted"
        epoch, k = divmod(run.step, run.per_epoch)
        if epoch != perm_epoch:  # each epoch's order is a pure function of (seed, epoch): resumable
            perm_epoch, perm = epoch, torch.randperm(len(train), generator=torch.Generator().manual_seed(
                (cfg.seed << 20) + epoch))
        assert perm is not None  # drawn above on the first pass: perm_epoch starts at -1
        batch = train[perm[k * cfg.batch_size : (k + 1) * cfg.batch_size]].to(device)
        for group in opt.param_groups:
            group["lr"] = _lr(cfg, run.step, run.total)
        with _autocast(device):
            loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        run.step += 1
        run.window_sum += loss.item()
        run.window_steps += 1
        if run.step % cfg.eval_every == 0 or run.step == run.total:
            out_of_patience = _report(run, model, val, device, on_event, time.perf_counter() - t0 + done_before)
            if out_of_patience and run.step < run.total:
                reason = "early_stopping"
                break
        if cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0 and run.step < run.total:
            _checkpoint(run, model, opt, tokenizer, ckpt_root, device, on_checkpoint)
            saved_at = run.step
    run.seconds = done_before + time.perf_counter() - t0
    if run.window_steps:  # stopped between evaluations (time limit): report the last stretch too
        _report(run, model, val, device, on_event, run.seconds)
    return reason


def _report(run: _Run, model, val, device, on_event, seconds: float) -> bool:
    """Evaluate, keep the best weights, emit an event; true when patience has run out."""
    run.train_loss = run.window_sum / run.window_steps
    run.window_sum, run.window_steps = 0.0, 0
    event = {"step": run.step, "epoch": round(run.step / run.per_epoch, 4), "loss": run.train_loss,
             "lr": _lr(run.cfg, run.step - 1, run.total), "seconds": round(seconds, 2)}
    if val is not None:
        run.last_eval = event["eval_loss"] = _evaluate(model, val, run.cfg.batch_size, device)
        assert run.best is not None  # with a validation split, set by the first evaluation (or restored)
        if run.last_eval < run.best - 1e-4:
            run.best, run.best_step, run.bad_evals = run.last_eval, run.step, 0
            run.best_params = _trainable_copy(model)
        else:
            run.bad_evals += 1
        event["best_eval_loss"] = run.best
    if on_event:
        on_event({k: _finite(v) for k, v in event.items()})
    return bool(run.cfg.patience and run.bad_evals >= run.cfg.patience)


def _finite(value: Any) -> Any:
    """NaN or infinite losses as None: JSON columns and strict parsers refuse them."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _trainable_copy(model) -> dict:
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def _checkpoint(run: _Run, model, opt, tokenizer, root: Path, device: str, on_checkpoint) -> Path:
    """Write ``root/step-N`` through a temporary directory, so a crash never leaves half of one."""
    import torch
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / f"step-{run.step:08d}", root / f".step-{run.step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)  # a LoRA model writes only its adapter
    tokenizer.save_pretrained(tmp)
    if run.best_params is not None and run.best_step != run.step:
        save_file(run.best_params, tmp / BEST_FILE)
    extra = {"optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state()}
    if device.startswith("cuda"):
        extra["cuda_rng"] = torch.cuda.get_rng_state(torch.device(device))
    torch.save(extra, tmp / OPTIMIZER_FILE)
    return commit_checkpoint(run, tmp, final, on_checkpoint)


def _check_resumable(state: dict[str, Any], cfg: FinetuneConfig, fingerprint: str) -> None:
    for key in RESUME_KEYS:
        if state["config"].get(key) != getattr(cfg, key):
            raise ValueError(f"cannot resume: the checkpoint was trained with {key}={state['config'].get(key)!r}, "
                             f"this run asks for {getattr(cfg, key)!r}")
    if state["texts_sha256"] != fingerprint:
        raise ValueError("cannot resume: the dataset differs from the one the checkpoint was trained on")


def _save_final(run: _Run, model, tokenizer, base_dir: Path, out_dir: Path, metrics: dict) -> None:
    """The best-eval weights, LoRA merged in, as a plain model directory."""
    import torch
    from transformers import AutoModelForCausalLM

    if not run.cfg.keep_best:
        if run.cfg.lora:
            model = model.merge_and_unload()
    elif run.val_tokens and run.best_step == 0:
        # fine-tuning never beat the base model on held-out text: the base is the best model
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, use_safetensors=True)
    else:  # keep_best, and fine-tuning beat the base
        if run.best_params is not None and run.best_step != run.step:
            with torch.no_grad():
                named = dict(model.named_parameters())
                for name, value in run.best_params.items():
                    named[name].copy_(value)
        if run.cfg.lora:
            model = model.merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to("cpu").save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "finetune.json").write_text(json.dumps({"config": run.cfg.to_dict(), "metrics": metrics}, indent=1))
