"""Text backend on transformers: any causal LM directory, batched, one random generator per item.

Effective parameters, first found wins: the request's (item > job > registry defaults, merged by the
worker), the checkpoint's ``generation_config.json`` (sampling defaults), then the project defaults
declared on ``aigc_models.params.TextParams`` (the contract the submit side validates against too).
Every EOS id the checkpoint lists ends an item; ids the tokenizer has no token for are never drawn.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, cast

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from aigc_models.base import Backend, BackendError, GenRequest, Output, module_facts
from aigc_models.device import default_dtype
from aigc_models.params import TextParams

transformers.logging.set_verbosity_error()  # a batch worker's log is for its own events
transformers.logging.disable_progress_bar()

# What a checkpoint's generation_config.json may set for us (its max_length is a context, not a default).
CHECKPOINT_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty", "do_sample")


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
        return cast(torch.FloatTensor, out)


class MaskIds(LogitsProcessor):
    """Ids past the tokenizer (a vocabulary padded to a round size) are never chosen: they decode to ''."""

    def __init__(self, invalid: torch.Tensor):
        self.invalid = invalid  # bool, one per logit

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return cast(torch.FloatTensor, scores.masked_fill(self.invalid.to(scores.device), float("-inf")))


class StopOnStrings(StoppingCriteria):
    """Ends a row once its new text holds one of the stop strings. Only the last tokens are decoded:
    a stop string that just appeared lies within them."""

    def __init__(self, tokenizer, stops: list[str], prompt_len: int):
        self.tokenizer = tokenizer
        self.stops = stops
        self.prompt_len = prompt_len
        self.window = 4 * max(len(s) for s in stops) + 8  # a token may carry a fraction of a character

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        tails = input_ids[:, max(self.prompt_len, input_ids.shape[1] - self.window):]
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
        hit = [any(s in t for s in self.stops) for t in texts]
        return cast(torch.BoolTensor, torch.tensor(hit, dtype=torch.bool, device=input_ids.device))


def read_generation_config(path: Path) -> dict[str, Any]:
    """The checkpoint's generation_config.json as written ({} when it has none)."""
    try:
        data = json.loads((Path(path) / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


class CausalLMGenerator(Backend):
    """Loads ``AutoModelForCausalLM`` + tokenizer from a directory and generates in batches."""

    Params = TextParams

    def __init__(self, model, tokenizer, device: str, source: Path, checkpoint: dict[str, Any] | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.source = source
        gen = checkpoint or {}
        # The checkpoint's sampling defaults, used where the request sets none.
        self.checkpoint = {k: gen[k] for k in CHECKPOINT_KEYS if gen.get(k) is not None}
        # Every EOS id the checkpoint lists (an int or a list), the model config's and the tokenizer's.
        eos = _ids(gen.get("eos_token_id")) + _ids(model.config.eos_token_id) + _ids(tokenizer.eos_token_id)
        self.eos_ids = list(dict.fromkeys(eos))
        pad = gen.get("pad_token_id")
        if pad is None:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos_ids or [0])[0]
        self.pad_id = int(pad)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(self.pad_id)
        self.invalid = self._invalid_ids()

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
        # transformers' stubs type PreTrainedModel.to as a wrapper taking the model, not the device.
        model = model.to(device)  # type: ignore[arg-type]
        return cls(model.eval(), tokenizer, device, Path(path), read_generation_config(Path(path)))

    def _invalid_ids(self) -> torch.Tensor | None:
        """A bool per output logit: True where the tokenizer has no token (None when there is none)."""
        head = self.model.get_output_embeddings()
        size = int(head.weight.shape[0]) if head is not None else int(self.model.config.vocab_size)
        invalid = torch.ones(size, dtype=torch.bool, device=self.device)  # kept where the logits are
        known = [i for i in self.tokenizer.get_vocab().values() if 0 <= i < size]
        invalid[known] = False
        return invalid if bool(invalid.any()) else None

    def memory_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def describe(self) -> dict[str, Any]:
        return {
            **module_facts(self.model),
            "device": self.device,
        }

    def checkpoint_params(self) -> dict[str, Any]:
        return self.checkpoint

    def group_key(self, r: GenRequest) -> Any:
        return r.messages is not None  # a group is all chat items or all prompts

    def render(self, r: GenRequest) -> tuple[str, str | None]:
        """The prompt text, and for a chat item the template it was rendered with."""
        if r.messages is None:
            return r.prompt, None
        template = r.chat_template or self.tokenizer.chat_template
        if isinstance(template, dict):  # named templates: the default one
            template = template.get("default")
        if not template:
            raise BackendError("this model has no chat template: give a prompt, or register the model with "
                               "defaults.chat_template")
        text = self.tokenizer.apply_chat_template(r.messages, chat_template=template, add_generation_prompt=True,
                                                  tokenize=False)
        return str(text), template

    def _run(self, params: dict[str, Any], reqs: list[GenRequest]) -> list[Output]:
        t0 = time.perf_counter()
        rendered = [self.render(r) for r in reqs]
        chat = reqs[0].messages is not None  # a group is all chat or all prompts
        # A rendered template already holds its special tokens (a BOS among them).
        enc = self.tokenizer([p for p, _ in rendered], return_tensors="pt", padding=True,
                             add_special_tokens=not chat).to(self.device)
        new_tokens = self._forward(enc, params, [r.seed for r in reqs])
        return self.postprocess(reqs, rendered, enc, new_tokens, params, time.perf_counter() - t0)

    @torch.inference_mode()
    def _forward(self, enc, params: dict[str, Any], seeds: list[int]) -> torch.Tensor:
        n = int(params["max_new_tokens"])
        ctx = getattr(self.model.config, "n_positions", None) or getattr(
            self.model.config, "max_position_embeddings", None
        )
        prompt_len = int(enc["input_ids"].shape[1])
        if ctx is not None and prompt_len + n > ctx:
            raise BackendError(f"prompt plus max_new_tokens exceeds the model's context of {ctx} tokens")
        processors = LogitsProcessorList()
        if self.invalid is not None:
            processors.append(MaskIds(self.invalid))
        if params["do_sample"] and params["temperature"] > 0:
            gens = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]
            processors.append(PerRowSampler(gens, params["temperature"], params["top_k"], params["top_p"]))
        stopping = StoppingCriteriaList()
        if params["stop"]:
            stopping.append(StopOnStrings(self.tokenizer, list(params["stop"]), prompt_len))
        config = GenerationConfig(
            max_new_tokens=n,
            min_new_tokens=0 if params["stop_at_eos"] else n,
            do_sample=False,
            repetition_penalty=params["repetition_penalty"],
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_ids or None,
        )
        out = self.model.generate(**enc, generation_config=config, logits_processor=processors,
                                  stopping_criteria=stopping)
        return out[:, prompt_len:]

    def postprocess(self, reqs: list[GenRequest], rendered: list[tuple[str, str | None]], enc,
                    new_tokens: torch.Tensor, params: dict[str, Any], seconds: float) -> list[Output]:
        eos = set(self.eos_ids)
        outs = []
        for i in range(len(reqs)):
            ids = new_tokens[i].tolist()
            finish = "length"
            ended = next((k for k, t in enumerate(ids) if t in eos), None)
            if ended is not None and params["stop_at_eos"]:
                ids, finish = ids[:ended], "stop"
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            cut = self._stop_at(text, params["stop"])
            if cut is not None:
                text, finish = text[:cut], "stop"
                ids = ids[: self._tokens_until(ids, params["stop"])]
            prompt, template = rendered[i]
            if params["echo"]:
                text = prompt + text
            info: dict[str, Any] = {
                "prompt_tokens": int(enc["attention_mask"][i].sum()),
                "new_tokens": len(ids),
                "finish_reason": finish,
                "batch_size": len(reqs),
                "batch_seconds": round(seconds, 4),
                "prompt_sha256": hashlib.sha256(prompt.encode()).hexdigest(),
            }
            if template is not None:
                info["chat_template_sha256"] = hashlib.sha256(template.encode()).hexdigest()
            outs.append(Output(text.encode("utf-8"), "text/plain; charset=utf-8", "txt", info))
        return outs

    @staticmethod
    def _stop_at(text: str, stops: list[str] | None) -> int | None:
        """Where the first stop string begins in ``text`` (None: none does)."""
        found = [p for s in stops or [] if (p := text.find(s)) >= 0]
        return min(found) if found else None

    def _tokens_until(self, ids: list[int], stops: list[str]) -> int:
        """How many tokens it took to write a stop string: the fewest whose text holds one (the tokens
        after it are padding of a finished row)."""
        lo, hi = 1, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if self._stop_at(self.tokenizer.decode(ids[:mid], skip_special_tokens=True), stops) is None:
                lo = mid + 1
            else:
                hi = mid
        return hi
