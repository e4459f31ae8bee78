"""A test backend that takes its time: the null backend's bytes after ``AIGC_TEST_SLOW_S`` seconds
(default 0.5) per request, so a test can act while a micro-batch runs. Workers load it with
``AIGC_BACKENDS=slow=tests.support.slow_backend:SlowGenerator``."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

from aigc_models.base import GenRequest, Output
from bench.null import NullGenerator


class SlowGenerator(NullGenerator):
    @classmethod
    def load(cls, path: Path | str, device: str = "cpu", dtype: str | None = None) -> SlowGenerator:
        return cls(device, path)

    def generate(self, requests: Sequence[GenRequest]) -> list[Output]:
        time.sleep(float(os.environ.get("AIGC_TEST_SLOW_S", "0.5")) * len(requests))
        return super().generate(requests)
