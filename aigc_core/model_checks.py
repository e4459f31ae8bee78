"""What registration reads from a checkpoint before anything is written, without torch or transformers:
its files (a local directory or an S3 prefix), its config.json / model_index.json, whether its weights
are safetensors, and the digest of an S3 prefix (the same digest ``dir_digest`` gives its download, so
the fetch check in ``registry._download_checked`` compares like with like)."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from aigc_core.errors import NotFound, SpecError

# Weights in these formats are pickles: loading one runs code. Backends load safetensors only.
PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# The safetensors format's own cap on its JSON header (100 MB); a larger length is a corrupt file.
SAFETENSORS_MAX_HEADER = 100_000_000
# Backends whose checkpoint is a transformers model directory: config.json and weights at the top.
TRANSFORMERS_BACKENDS = ("hf-causal-lm", "hf-tts")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint's files by relative POSIX name, and a way to read a small one (None: absent)."""

    where: str
    names: tuple[str, ...]
    read: Callable[[str], bytes | None]

    def json(self, name: str) -> dict[str, Any] | None:
        """A JSON file of the checkpoint as a mapping; None when absent; a SpecError when unreadable."""
        raw = self.read(name)
        if raw is None:
            return None
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise SpecError(f"{self.where}/{name} is not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise SpecError(f"{self.where}/{name} is not a JSON object")
        return data


def local_checkpoint(path: Path) -> Checkpoint:
    def read(name: str) -> bytes | None:
        f = path / name
        return f.read_bytes() if f.is_file() else None

    names = tuple(sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()))
    return Checkpoint(str(path), names, read)


def s3_checkpoint(store: Any, uri: str) -> Checkpoint:
    """``store`` is an ``S3Store`` rooted at the model's prefix."""
    def read(name: str) -> bytes | None:
        try:
            return bytes(store.get(name))
        except NotFound:
            return None

    names = tuple(k for k in store.list("") if k and not k.endswith("/"))
    return Checkpoint(uri.rstrip("/"), names, read)


def read_facts(kind: str, ck: Checkpoint) -> dict[str, Any]:
    """The checkpoint's model_type, and for a text model its context length (n_positions,
    max_position_embeddings or n_ctx of config.json), where config.json says."""
    config = ck.json("config.json") or {}
    facts: dict[str, Any] = {}
    if isinstance(config.get("model_type"), str):
        facts["model_type"] = config["model_type"]
    if kind == "text":
        for key in ("n_positions", "max_position_embeddings", "n_ctx"):
            value = config.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                facts["context_length"] = value
                break
    return facts


def check_checkpoint(backend: str, ck: Checkpoint, architectures: dict[str, tuple[str, ...]]) -> None:
    """Refuse, in one line, a checkpoint ``backend`` cannot load: no config, an architecture it does not
    run, or weights that are not safetensors. ``architectures``: model_types a backend picks a class by."""
    if backend in TRANSFORMERS_BACKENDS:
        config = ck.json("config.json")
        if config is None:
            raise SpecError(f"{ck.where}: no config.json: not a transformers model directory")
        _check_architecture(backend, config, ck.where, architectures)
        _check_weights(ck, "")
        if config.get("model_type") == "speecht5":  # its waveform comes from a HiFi-GAN of its own
            if "vocoder/config.json" not in ck.names:
                raise SpecError(f"{ck.where}: SpeechT5 needs its HiFi-GAN vocoder (SpeechT5HifiGan) saved in vocoder/")
            _check_weights(ck, "vocoder/")
    elif backend == "diffusers":
        index = ck.json("model_index.json")
        if index is None:
            raise SpecError(f"{ck.where}: no model_index.json: not a diffusers pipeline directory")
        cls = index.get("_class_name")
        if not isinstance(cls, str) or not cls.endswith("Pipeline"):
            raise SpecError(f"{ck.where}/model_index.json: _class_name {cls!r} is not a diffusers pipeline")
        folders = sorted({n.split("/")[0] for n in ck.names if "/" in n})
        for folder in folders:
            _check_weights(ck, folder + "/", required=False)
        if not any(n.endswith(".safetensors") for n in ck.names):
            raise SpecError(f"{ck.where}: no weights in safetensors (*.safetensors) in any component folder")
    elif backend == "digits":
        if ck.json("config.json") is None:
            raise SpecError(f"{ck.where}: no config.json: not a digits model directory (aigc_models.digits.save)")
        _check_weights(ck, "")


def _check_architecture(backend: str, config: dict[str, Any], where: str,
                        architectures: dict[str, tuple[str, ...]]) -> None:
    model_type = config.get("model_type")
    supported = architectures.get(backend)
    if supported is not None:
        if model_type not in supported:
            raise SpecError(f"{where}/config.json: model_type {model_type!r} is not supported by the {backend} "
                            f"backend (supported: {', '.join(supported)})")
        return
    # A causal LM: transformers' AutoModelForCausalLM loads the classes named ...ForCausalLM or
    # ...LMHeadModel (read from config.json: the mapping itself lives in a module that imports torch).
    names = config.get("architectures") or []
    if not isinstance(names, list) or not names:
        if not isinstance(model_type, str):
            raise SpecError(f"{where}/config.json: neither architectures nor model_type: not a transformers config")
        return
    if not any(isinstance(n, str) and n.endswith(("ForCausalLM", "LMHeadModel")) for n in names):
        audio = any(model_type in archs for archs in architectures.values())
        hint = f"; a {model_type} checkpoint is an audio model: --kind audio" if audio else ""
        raise SpecError(f"{where}/config.json: architecture {', '.join(map(str, names))} is not a causal language "
                        f"model (the {backend} backend loads ...ForCausalLM / ...LMHeadModel classes){hint}")


def _check_weights(ck: Checkpoint, folder: str, *, required: bool = True) -> None:
    here = [n for n in ck.names if n.startswith(folder) and "/" not in n[len(folder):]]
    if any(n.endswith(".safetensors") for n in here):
        return
    pickled = [n for n in here if n.endswith(PICKLED)]
    if pickled:
        raise SpecError(f"{ck.where}: weights are not in safetensors ({', '.join(pickled[:3])}): pickled weights "
                        "are never loaded; convert them (save_pretrained(..., safe_serialization=True))")
    if required:
        raise SpecError(f"{ck.where}/{folder}: no weights (*.safetensors)".replace("/:", ":"))


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a ``*.safetensors`` file, read from its header alone (the tensors' bytes are
    not read), or None: an 8-byte little-endian header length, a JSON header of that length, and
    tensor data whose extent the header's offsets cover exactly (what ``safetensors`` checks before it
    loads anything). A truncated upload or copy fails the last check."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{size} bytes: too short for a safetensors header (truncated or not safetensors)"
            (n,) = struct.unpack("<Q", head)
            if n > SAFETENSORS_MAX_HEADER or 8 + n > size:
                return f"a header of {n} bytes in a file of {size}: truncated or corrupt"
            raw = f.read(n)
    except OSError as e:
        return f"cannot be read ({e})"
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, RecursionError) as e:
        return f"its header is not a safetensors header ({e}): corrupt or not safetensors"
    data = size - 8 - n
    if max(ends, default=0) != data:
        return (f"its tensors need {max(ends, default=0)} bytes of data and the file holds {data}: "
                f"{'truncated' if data < max(ends, default=0) else 'corrupt'}")
    return None


def check_local_weights(path: Path, names: tuple[str, ...]) -> None:
    """Refuse a local checkpoint whose ``*.safetensors`` files are truncated or corrupt, naming the file."""
    for name in names:
        if name.endswith(".safetensors") and (problem := safetensors_problem(path / name)):
            raise SpecError(f"{path}/{name}: {problem}")


def s3_digest(store: Any, names: tuple[str, ...]) -> str:
    """sha256 over each object's key (relative to the prefix) and content, in the order and form of
    ``registry.dir_digest`` over the same files downloaded: a model's digest does not depend on where it
    lies. Contents, not ETags: a multipart upload's ETag is no hash of the bytes, and the fetch check
    hashes the bytes. Objects are streamed, never held whole."""
    h = hashlib.sha256()
    for name in sorted(names, key=PurePosixPath):
        key = f"{store.prefix}/{name}" if store.prefix else name
        body = store.client.get_object(Bucket=store.bucket, Key=key)["Body"]
        f = hashlib.sha256()
        for block in body.iter_chunks(1 << 20):
            f.update(block)
        h.update(name.encode() + b"\0")
        h.update(f.hexdigest().encode() + b"\n")
    return "sha256:" + h.hexdigest()
