"""Device and dtype choice. Only called after fork: a forking parent never touches CUDA."""

from __future__ import annotations

import torch


def resolve_device(preference: str = "auto") -> str:
    if preference != "auto":
        return preference
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def default_dtype(device: str, requested: str | None = None) -> torch.dtype:
    """bf16 on GPUs that have it (fp16 on older ones), fp32 on CPU, unless the model asks."""
    if requested:
        return getattr(torch, requested)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32
