"""The types every backend speaks, and the table that maps a backend name to its class."""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


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


def group_by_params(requests: Sequence[GenRequest], defaults: dict[str, Any],
                    per_item: tuple[str, ...] = ()) -> list[tuple[dict[str, Any], list[int]]]:
    """Positions of requests that share their effective params (unknown keys ignored), in first-seen
    order; keys in ``per_item`` may differ inside one group."""
    groups: dict[str, tuple[dict[str, Any], list[int]]] = {}
    for pos, r in enumerate(requests):
        params = {k: r.params.get(k, v) for k, v in defaults.items()}
        key = repr(sorted((k, v) for k, v in params.items() if k not in per_item))
        groups.setdefault(key, (params, []))[1].append(pos)
    return list(groups.values())


def in_order(requests: Sequence[GenRequest], run_group, groups) -> list[Output]:
    """Run each group and put the outputs back in request order."""
    results: dict[int, Output] = {}
    for params, positions in groups:
        for pos, out in zip(positions, run_group(params, [requests[i] for i in positions]), strict=True):
            results[pos] = out
    return [results[i] for i in range(len(requests))]


BACKENDS: dict[str, str] = {
    "hf-causal-lm": "aigc_models.text:CausalLMGenerator",
    "diffusers": "aigc_models.image:DiffusersImageGenerator",
    "digits": "aigc_models.image:DigitsGenerator",
    "hf-tts": "aigc_models.audio:HFAudio",  # VITS, MusicGen, SpeechT5: picked by config.json model_type
    "espeak": "aigc_models.audio:EspeakGenerator",
}


def load_backend(name: str, path: Path, device: str, dtype: str | None = None,
                 extra: Mapping[str, str] | None = None) -> Generator:
    """Import the backend class by name and load the model directory onto ``device``; ``extra`` adds
    "module:Class" entries to the built-in table (the workers' AIGC_BACKENDS setting)."""
    table = {**BACKENDS, **(extra or {})}
    target = table.get(name)
    if target is None:
        raise BackendError(f"unknown backend {name!r}; known: {', '.join(sorted(table))}")
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls).load(path, device=device, dtype=dtype)
