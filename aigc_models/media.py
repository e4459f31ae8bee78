"""Provenance inside the files themselves, where the format has a standard place for it."""

from __future__ import annotations

from typing import Any


def embed_metadata(data: bytes, media_type: str, meta: dict[str, Any]) -> bytes:
    """Placeholder until the PNG/WAV embedding lands: text and other types are returned unchanged."""
    return data
