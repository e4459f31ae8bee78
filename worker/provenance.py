"""Library versions recorded in every output's provenance (read once per process)."""

from __future__ import annotations

from functools import lru_cache
from importlib import metadata

LIBRARIES = ("torch", "transformers", "tokenizers", "safetensors", "diffusers", "numpy")


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out
