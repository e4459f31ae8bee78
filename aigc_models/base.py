"""The types every backend speaks, and the table that maps a backend name to its class."""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ValidationError

from aigc_models.params import BackendParams


@dataclass(frozen=True)
class GenRequest:
    """One item to generate: its own seed makes it reproducible alone.

    ``params`` are the values set for the item (item > job > registry defaults, merged by the worker),
    ``sources`` says which of those layers set each ("item", "job", "registry"); a backend fills the
    rest from the checkpoint, then its own defaults. ``messages`` (OpenAI's chat shape) make a chat
    item, rendered with the model's chat template (``chat_template`` from the registry overrides it)."""

    index: int
    prompt: str
    params: dict[str, Any]
    seed: int
    messages: list[dict[str, str]] | None = None
    sources: dict[str, str] = field(default_factory=dict)
    chat_template: str | None = None


@dataclass(frozen=True)
class Output:
    data: bytes
    media_type: str
    ext: str
    info: dict[str, Any] = field(default_factory=dict)


class BackendError(Exception):
    """A backend could not load or could not generate; the worker maps it to the runner's errors."""


class Generator(Protocol):
    """A loaded model, pinned in a worker; ``generate`` returns one Output per request, in order."""

    device: str

    def generate(self, requests: Sequence[GenRequest]) -> list[Output]: ...

    def memory_bytes(self) -> int: ...

    def describe(self) -> dict[str, Any]: ...


class Backend:
    """What every backend repeats, done once: each request's effective parameters (request >
    checkpoint > the project default declared in ``Params``, with where each came from), requests
    grouped by them, groups cut into micro-batches of ``batch_size``, outputs back in request order
    with the parameters that ran in their ``info`` (provenance records them).

    A backend sets ``Params`` (its contract in aigc_models/params.py) and writes ``load`` and
    ``_run(params, requests)`` (its ``preprocess``, ``_forward`` and ``postprocess``); it may override
    ``checkpoint_params`` (the checkpoint's own values), ``adjust`` (values that depend on others) and
    ``check_group`` (what only the loaded model can tell, e.g. its number of speakers)."""

    Params: ClassVar[type[BackendParams]]
    per_item: ClassVar[tuple[str, ...]] = ()  # parameters that may differ inside one group
    batch_size: ClassVar[int | None] = None  # requests per _run call (None: a whole group)

    def generate(self, requests: Sequence[GenRequest]) -> list[Output]:
        """Requests that share their effective parameters run together; results come back in request order."""
        resolved = [self.effective(r) for r in requests]
        results: dict[int, Output] = {}
        for params, positions in self.preprocess(requests, resolved):
            step = self.batch_size or len(positions)
            for k in range(0, len(positions), step):
                part = positions[k : k + step]
                outs = self._run(params, [requests[i] for i in part])
                for pos, out in zip(part, outs, strict=True):
                    out.info.setdefault("params", resolved[pos][0])
                    out.info.setdefault("param_sources", resolved[pos][1])
                    results[pos] = out
        return [results[i] for i in range(len(requests))]

    def preprocess(self, requests: Sequence[GenRequest],
                   resolved: Sequence[tuple[dict[str, Any], dict[str, str]]] | None = None,
                   ) -> list[tuple[dict[str, Any], list[int]]]:
        """Positions of requests that share their effective parameters (``per_item`` ones aside), in
        first-seen order, each group checked by ``check_group``."""
        resolved = resolved if resolved is not None else [self.effective(r) for r in requests]
        groups: dict[str, tuple[dict[str, Any], list[int]]] = {}
        for pos, (r, (params, _)) in enumerate(zip(requests, resolved, strict=True)):
            shared = {k: v for k, v in params.items() if k not in self.per_item}
            key = repr((self.group_key(r), sorted(shared.items())))
            groups.setdefault(key, (dict(params), []))[1].append(pos)
        for params, _ in groups.values():
            self.check_group(params)
        return list(groups.values())

    def effective(self, r: GenRequest) -> tuple[dict[str, Any], dict[str, str]]:
        """The parameters this request runs with, and where each came from: the request's layer
        ("item", "job" or "registry"), "checkpoint" or "default". Values the request sets are checked
        against ``Params`` (names it does not declare are another backend's, and ignored)."""
        fields = self.Params.model_fields
        asked = {k: v for k, v in r.params.items() if k in fields and v is not None}
        try:
            checked = self.Params.model_validate(asked)
        except ValidationError as e:
            raise BackendError(describe_error(e, self.Params)) from None
        own = self.checkpoint_params()
        params: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for k, default in self.Params.project_defaults().items():
            if k in asked:
                params[k], sources[k] = getattr(checked, k), r.sources.get(k, "job")
            elif own.get(k) is not None:
                params[k], sources[k] = own[k], "checkpoint"
            else:
                params[k], sources[k] = default, "default"
        self.adjust(params, sources)
        return params, sources

    def checkpoint_params(self) -> dict[str, Any]:
        """The checkpoint's own values for parameters the request leaves unset ({}: none)."""
        return {}

    def adjust(self, params: dict[str, Any], sources: dict[str, str]) -> None:
        """Values that follow from others (in place); nothing by default."""

    def check_group(self, params: dict[str, Any]) -> None:
        """Raise BackendError for values only the loaded model can refuse; nothing by default."""

    def group_key(self, r: GenRequest) -> Any:
        """What else keeps two requests apart besides their parameters (None: nothing)."""
        return None

    def _run(self, params: dict[str, Any], requests: list[GenRequest]) -> list[Output]:
        raise NotImplementedError


def describe_error(e: ValidationError, schema: type[BaseModel]) -> str:
    """A parameter refused at run time, in one line naming it and its range."""
    parts = []
    for err in e.errors()[:3]:
        name = str(err["loc"][0]) if err["loc"] else "params"
        lo, hi = _bounds(schema, name)
        if err["type"] in ("greater_than_equal", "less_than_equal", "greater_than", "less_than") and \
                lo is not None and hi is not None:
            parts.append(f"{name} must be between {lo} and {hi}")
        elif err["type"] == "multiple_of":
            parts.append(f"{name} must be a multiple of {err.get('ctx', {}).get('multiple_of')}")
        elif err["type"] == "string_pattern_mismatch":
            parts.append(f"bad {name} {err.get('input')!r}")
        elif err["type"] == "literal_error":
            parts.append(f"{name} must be {err.get('ctx', {}).get('expected')}")
        else:
            parts.append(f"{name}: {err['msg']}")
    return "; ".join(parts)


def _bounds(schema: type[BaseModel], name: str) -> tuple[Any, Any]:
    f = schema.model_fields.get(name)
    lo = hi = None
    for m in f.metadata if f is not None else []:
        lo = getattr(m, "ge", getattr(m, "gt", lo))
        hi = getattr(m, "le", getattr(m, "lt", hi))
    return lo, hi


def group_by_params(requests: Sequence[GenRequest], defaults: dict[str, Any],
                    per_item: tuple[str, ...] = ()) -> list[tuple[dict[str, Any], list[int]]]:
    """Positions of requests that share their params (unknown keys ignored), in first-seen order;
    keys in ``per_item`` may differ inside one group. (For backends outside ``Backend``.)"""
    groups: dict[str, tuple[dict[str, Any], list[int]]] = {}
    for pos, r in enumerate(requests):
        params = {k: r.params.get(k, v) for k, v in defaults.items()}
        key = repr(sorted((k, v) for k, v in params.items() if k not in per_item))
        groups.setdefault(key, (params, []))[1].append(pos)
    return list(groups.values())


def in_order(requests: Sequence[GenRequest], run_group, groups) -> list[Output]:
    """Run each group and put the outputs back in request order. (For backends outside ``Backend``.)"""
    results: dict[int, Output] = {}
    for params, positions in groups:
        for pos, out in zip(positions, run_group(params, [requests[i] for i in positions]), strict=True):
            results[pos] = out
    return [results[i] for i in range(len(requests))]


def module_facts(model: Any) -> dict[str, Any]:
    """What a backend's ``describe`` says of any torch module: its class, parameter count and dtype."""
    return {"class": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}


BACKENDS: dict[str, str] = {
    "hf-causal-lm": "aigc_models.text:CausalLMGenerator",
    "diffusers": "aigc_models.image:DiffusersImageGenerator",
    "digits": "aigc_models.image:DigitsGenerator",
    "hf-tts": "aigc_models.audio:HFAudio",  # VITS, MusicGen, SpeechT5: picked by config.json model_type
    "espeak": "aigc_models.audio:EspeakGenerator",
}


def load_backend(name: str, path: Path | str, device: str, dtype: str | None = None,
                 extra: Mapping[str, str] | None = None) -> Generator:
    """Import the backend class by name and load the model directory onto ``device``; ``extra`` adds
    "module:Class" entries to the built-in table (the workers' AIGC_BACKENDS setting)."""
    table = {**BACKENDS, **(extra or {})}
    target = table.get(name)
    if target is None:
        raise BackendError(f"unknown backend {name!r}; known: {', '.join(sorted(table))}")
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls).load(path, device=device, dtype=dtype)
