"""What a chunk's delivery works with: its claimed items, its job, its result, and each item's
generation request (the parameters it sets and the layer each came from)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aigc_core.registry import ModelRef, generation_defaults
from aigc_models import GenRequest


@dataclass(frozen=True)
class Claimed:
    id: int
    index: int
    custom_id: str
    prompt: str
    params: dict[str, Any]
    seed: int
    attempts: int
    source: dict[str, Any] | None = None
    messages: list[dict[str, str]] | None = None  # a chat item (the prompt is then empty)
    reuse_key: str | None = None  # what made its output, hashed (worker/reuse.py); stored on its artifact


@dataclass
class ChunkResult:
    job_id: str
    chunk_no: int
    claimed: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    reused: int = 0  # of the succeeded: an earlier identical output reused (the job option reuse)
    final_status: str | None = None
    errors: dict[str, int] = field(default_factory=dict)
    # Items whose attempt this delivery charged (their generation began): a transient fault gives
    # those back; items it never reached were never charged.
    charged: set[int] = field(default_factory=set)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "charged"}


@dataclass(frozen=True)
class JobInfo:
    id: str
    kind: str
    params: dict[str, Any]
    model: ModelRef
    reuse: bool = False  # the job option: take earlier identical outputs instead of generating


def requests_of(job: JobInfo, batch: list[Claimed]) -> list[GenRequest]:
    """Each item's request: the params it sets, item > job > registry defaults (a None sets nothing),
    with the layer each came from; the backend fills the rest from the checkpoint, then its defaults."""
    layers = (("registry", generation_defaults(job.model.defaults)), ("job", job.params))
    template = job.model.defaults.get("chat_template")
    out = []
    for c in batch:
        params: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for name, layer in (*layers, ("item", c.params or {})):
            for k, v in layer.items():
                if v is not None:
                    params[k], sources[k] = v, name
        out.append(GenRequest(c.index, c.prompt, params, c.seed, messages=c.messages, sources=sources,
                              chat_template=template))
    return out
