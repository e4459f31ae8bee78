"""The worker's Celery app plus two faulty text backends, for ``celery -A tests.faults.backends_app``.

``oom-text`` is the real causal-LM backend that raises torch.OutOfMemoryError on batches larger than
two, as a GPU would; ``crash-text`` kills its own process on a prompt containing CRASH, as a segfault
in a kernel would. Both load the real model through the real loading code.
"""

from __future__ import annotations

import os
import signal

from aigc_models.base import BACKENDS
from aigc_models.text import CausalLMGenerator
from worker.app import app  # the app celery -A loads

__all__ = ["CrashOnPrompt", "OomAboveTwo", "app"]

OOM_ABOVE = 2


class OomAboveTwo(CausalLMGenerator):
    def generate(self, requests):
        import torch

        if len(requests) > OOM_ABOVE:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated above {OOM_ABOVE} items)")
        return super().generate(requests)


class CrashOnPrompt(CausalLMGenerator):
    def generate(self, requests):
        if any("CRASH" in r.prompt for r in requests):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().generate(requests)


BACKENDS["oom-text"] = f"{__name__}:OomAboveTwo"
BACKENDS["crash-text"] = f"{__name__}:CrashOnPrompt"
