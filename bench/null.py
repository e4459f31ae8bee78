"""The benchmarks' null backend: fixed bytes, no model and no torch. It measures the runner's own
machinery per item. Not in the product's backend table: workers load it with
``AIGC_BACKENDS=null=bench.null:NullGenerator`` (bench.common sets it for the benchmarks)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aigc_models.base import GenRequest, Output

NULL_OUTPUT = b"null output: the runner's machinery without a model\n"


class NullGenerator:
    """Returns the same bytes for every request, instantly; ``load`` accepts any path (nothing is read)."""

    def __init__(self, device: str = "cpu", source: Path | str | None = None):
        self.device = device
        self.source = source

    @classmethod
    def load(cls, path: Path | str, device: str = "cpu", dtype: str | None = None) -> NullGenerator:
        return cls(device, path)

    def memory_bytes(self) -> int:
        return 0

    def describe(self) -> dict[str, Any]:
        return {"class": type(self).__name__, "parameters": 0, "device": self.device}

    def generate(self, requests: Sequence[GenRequest]) -> list[Output]:
        return [Output(NULL_OUTPUT, "text/plain; charset=utf-8", "txt", {"batch_size": len(requests)})
                for _ in requests]
