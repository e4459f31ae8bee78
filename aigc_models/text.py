"""Text backend on transformers: any causal LM directory, batched, one random generator per item."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LogitsProcessor, LogitsProcessorList

from aigc_models.base import BackendError, GenRequest, Output
from aigc_models.device import default_dtype

transformers.logging.set_verbosity_error()  # a batch worker's log is for its own events
transformers.logging.disable_progress_bar()

TEXT_DEFAULTS: dict[str, Any] = {
    "max_new_tokens": 128, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
    "repetition_penalty": 1.0, "do_sample": True, "stop_at_eos": True, "echo": False,
}


class PerRowSampler(LogitsProcessor):
    """Samples each row with its own torch.Generator, so an item's text does not depend on its batch.

    It runs as the last logits processor of a greedy ``generate`` and leaves one finite score per
    row: the token it drew. Temperature, top-k and top-p are applied here, per row.
    """

    def __init__(self, generators: list[torch.Generator], temperature: float, top_k: int, top_p: float):
        self.generators = generators
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = scores.float() / self.temperature
        if self.top_k > 0:
            kth = torch.topk(logits, min(self.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) > self.top_p  # keep the token that crosses top_p
            logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        probs = logits.softmax(-1)
        picks = torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(self.generators)])
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(len(picks), device=out.device), picks] = 0.0
        return out


class CausalLMGenerator:
    """Loads ``AutoModelForCausalLM`` + tokenizer from a directory and generates in batches."""

    def __init__(self, model, tokenizer, device: str, source: Path):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.source = source

    @classmethod
    def load(cls, path: Path, device: str = "cpu", dtype: str | None = None) -> CausalLMGenerator:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=default_dtype(device, dtype), use_safetensors=True
            )
        except (OSError, ValueError) as e:
            raise BackendError(f"cannot load a causal LM from {path}: {e}") from e
        tokenizer.padding_side = "left"  # decoder-only models continue from the right edge
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return cls(model.to(device).eval(), tokenizer, device, Path(path))

    def memory_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def describe(self) -> dict[str, Any]:
        return {
            "class": type(self.model).__name__,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
            "device": self.device,
        }

    def generate(self, requests: Sequence[GenRequest]) -> list[Output]:
        """Requests that share params run as one batch; results come back in request order."""
        results: dict[int, Output] = {}
        for params, group in self.preprocess(requests):
            for pos, out in zip(group, self._run(params, [requests[i] for i in group])):
                results[pos] = out
        return [results[i] for i in range(len(requests))]

    def preprocess(self, requests: Sequence[GenRequest]) -> list[tuple[dict[str, Any], list[int]]]:
        groups: dict[str, tuple[dict[str, Any], list[int]]] = {}
        for pos, r in enumerate(requests):
            params = {**TEXT_DEFAULTS, **r.params}
            groups.setdefault(repr(sorted(params.items())), (params, []))[1].append(pos)
        return list(groups.values())

    def _run(self, params: dict[str, Any], reqs: list[GenRequest]) -> list[Output]:
        t0 = time.perf_counter()
        enc = self.tokenizer([r.prompt for r in reqs], return_tensors="pt", padding=True).to(self.device)
        new_tokens = self._forward(enc, params, [r.seed for r in reqs])
        return self.postprocess(reqs, enc, new_tokens, params, time.perf_counter() - t0)

    @torch.inference_mode()
    def _forward(self, enc, params: dict[str, Any], seeds: list[int]) -> torch.Tensor:
        n = int(params["max_new_tokens"])
        ctx = getattr(self.model.config, "n_positions", None) or getattr(
            self.model.config, "max_position_embeddings", None
        )
        if ctx is not None and enc["input_ids"].shape[1] + n > ctx:
            raise BackendError(f"prompt plus max_new_tokens exceeds the model's context of {ctx} tokens")
        sampling = params["do_sample"] and params["temperature"] > 0
        processors = LogitsProcessorList()
        if sampling:
            gens = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]
            processors.append(PerRowSampler(gens, params["temperature"], params["top_k"], params["top_p"]))
        config = GenerationConfig(
            max_new_tokens=n,
            min_new_tokens=0 if params["stop_at_eos"] else n,
            do_sample=False,
            repetition_penalty=params["repetition_penalty"],
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        out = self.model.generate(**enc, generation_config=config, logits_processor=processors)
        return out[:, enc["input_ids"].shape[1]:]

    def postprocess(self, reqs, enc, new_tokens: torch.Tensor, params, seconds: float) -> list[Output]:
        eos = self.tokenizer.eos_token_id
        outs = []
        for i, r in enumerate(reqs):
            ids = new_tokens[i].tolist()
            finish = "length"
            if eos in ids:
                ids = ids[: ids.index(eos)]
                finish = "eos"
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if params["echo"]:
                text = r.prompt + text
            info = {
                "prompt_tokens": int(enc["attention_mask"][i].sum()),
                "new_tokens": len(ids),
                "finish_reason": finish,
                "batch_size": len(reqs),
                "batch_seconds": round(seconds, 4),
            }
            outs.append(Output(text.encode("utf-8"), "text/plain; charset=utf-8", "txt", info))
        return outs
