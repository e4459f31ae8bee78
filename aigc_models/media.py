"""Provenance inside the output file itself: a PNG text chunk, or a WAV RIFF LIST/INFO comment.

Both are standard chunks that viewers and players skip; the pixels and samples are untouched (the
chunk is spliced in, nothing is re-encoded). The same input and metadata always give the same bytes.
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any

PNG_KEY = "aigc:provenance"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _json(meta: dict[str, Any]) -> bytes:
    # ASCII only: a PNG tEXt chunk is Latin-1 and a RIFF INFO string is read as ASCII by most tools.
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str).encode("ascii")


def embed_metadata(data: bytes, media_type: str, meta: dict[str, Any]) -> bytes:
    """``data`` with ``meta`` as JSON inside: PNG and WAV get a chunk, other media types come back unchanged."""
    kind = media_type.split(";")[0].strip().lower()
    if kind == "image/png":
        return _png_with_text(data, PNG_KEY, _json(meta))
    if kind in ("audio/wav", "audio/x-wav", "audio/wave"):
        return _wav_with_comment(data, _json(meta))
    return data


# ---- PNG ----------------------------------------------------------------------------------------------

def _png_chunks(data: bytes):
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG file")
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        yield kind, data[pos : pos + 12 + length]
        pos += 12 + length


def _png_with_text(data: bytes, key: str, text: bytes) -> bytes:
    """Any earlier chunk under ``key`` is replaced; the new tEXt chunk goes just before IEND."""
    body = key.encode("latin-1") + b"\0" + text
    chunk = struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(">I", zlib.crc32(b"tEXt" + body))
    out = [PNG_SIGNATURE]
    for kind, raw in _png_chunks(data):
        if kind in (b"tEXt", b"iTXt", b"zTXt") and raw[8:].startswith(key.encode("latin-1") + b"\0"):
            continue
        if kind == b"IEND":
            out.append(chunk)
        out.append(raw)
    return b"".join(out)


def read_png_metadata(data: bytes) -> dict[str, Any]:
    for kind, raw in _png_chunks(data):
        prefix = PNG_KEY.encode("latin-1") + b"\0"
        if kind == b"tEXt" and raw[8:].startswith(prefix):
            return json.loads(raw[8 + len(prefix) : -4])
    return {}


# ---- WAV ----------------------------------------------------------------------------------------------

def _riff_chunks(data: bytes):
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("not a RIFF WAVE file")
    pos = 12
    while pos + 8 <= len(data):
        kind, size = struct.unpack("<4sI", data[pos : pos + 8])
        yield kind, data[pos + 8 : pos + 8 + size]
        pos += 8 + size + (size & 1)  # chunks are padded to an even length


def _sub_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack("<4sI", kind, len(payload)) + payload + (b"\0" if len(payload) & 1 else b"")


def _info_entries(payload: bytes):
    pos = 4  # after b"INFO"
    while pos + 8 <= len(payload):
        kind, size = struct.unpack("<4sI", payload[pos : pos + 8])
        yield kind, payload[pos + 8 : pos + 8 + size]
        pos += 8 + size + (size & 1)


def _wav_with_comment(data: bytes, comment: bytes) -> bytes:
    """A LIST/INFO chunk at the end with ICMT = ``comment``; other INFO entries already there are kept."""
    chunks, info = [], []
    for kind, payload in _riff_chunks(data):
        if kind == b"LIST" and payload[:4] == b"INFO":
            info += [(k, v) for k, v in _info_entries(payload) if k != b"ICMT"]
        else:
            chunks.append(_sub_chunk(kind, payload))
    info.append((b"ICMT", comment + b"\0"))  # INFO strings are NUL-terminated
    chunks.append(_sub_chunk(b"LIST", b"INFO" + b"".join(_sub_chunk(k, v) for k, v in info)))
    body = b"WAVE" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def read_wav_metadata(data: bytes) -> dict[str, Any]:
    """The JSON in the WAV's LIST/INFO ICMT entry, or ``{}`` when there is none."""
    for kind, payload in _riff_chunks(data):
        if kind == b"LIST" and payload[:4] == b"INFO":
            for k, v in _info_entries(payload):
                if k == b"ICMT":
                    return json.loads(v.rstrip(b"\0"))
    return {}
