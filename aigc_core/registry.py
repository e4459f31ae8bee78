"""The model registry: ``Model`` rows (seeded from models.yaml), name[@version] lookup, and fetching."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, ValidationError
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from aigc_core.errors import ModelLoadError, NotFound, SpecError, StorageError
from aigc_core.model_checks import (
    Checkpoint,
    check_checkpoint,
    check_local_weights,
    local_checkpoint,
    read_facts,
    s3_checkpoint,
    s3_digest,
)
from aigc_core.schema import Model
from aigc_core.spec import (
    KINDS,
    JobSpec,
    ModelFacts,
    check_model_fit,
    effective_params,
    format_validation_error,
    load_yaml,
    params_schema,
)

DEFAULT_BACKEND = {"text": "hf-causal-lm", "image": "diffusers", "audio": "hf-tts"}


@dataclass(frozen=True)
class ModelRef:
    """Everything a worker needs to load one exact model version."""

    name: str
    version: int
    kind: str
    backend: str
    uri: str
    revision: str | None = None
    digest: str | None = None
    queue: str = "text"
    defaults: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def tag(self) -> str:
        return f"{self.name}@{self.version}"

    @classmethod
    def from_row(cls, m: Model) -> ModelRef:
        return cls(m.name, m.version, m.kind, m.backend, m.uri, m.revision, m.digest, m.queue, dict(m.defaults or {}))


def parse_name(name: str) -> tuple[str, int | None]:
    base, sep, ver = name.partition("@")
    if not sep:
        return name, None
    if not ver.isdigit():
        raise SpecError(f"model {name!r}: the version after @ must be a number")
    return base, int(ver)


def resolve(session: Session, name: str) -> ModelRef:
    """``name`` is the newest version, ``name@N`` exactly version N."""
    base, version = parse_name(name)
    q = select(Model).where(Model.name == base)
    q = q.where(Model.version == version) if version is not None else q.order_by(Model.version.desc())
    row = session.scalars(q.limit(1)).first()
    if row is None:
        known = sorted(set(session.scalars(select(Model.name))))
        hint = f"; known models: {', '.join(known)}" if known else "; the registry is empty (see models.yaml)"
        raise SpecError(f"unknown model {name!r}{hint}")
    return ModelRef.from_row(row)


def register(
    session: Session,
    name: str,
    kind: str,
    uri: str,
    *,
    backend: str | None = None,
    revision: str | None = None,
    digest: str | None = None,
    queue: str | None = None,
    defaults: dict[str, Any] | None = None,
    lineage: dict[str, Any] | None = None,
) -> ModelRef:
    """Add a new version of ``name``; a local directory gets its digest computed now."""
    if kind not in KINDS:
        raise SpecError(f"model {name!r}: kind must be one of {', '.join(KINDS)}")
    check_model_name(name)
    check_defaults(name, defaults)
    if digest is None and uri.startswith("file://"):
        digest = dir_digest(local_path(uri))
    # Two registrations of one name at once: the unique (name, version) constraint lets one win;
    # the other takes the next number (a savepoint keeps the caller's transaction usable).
    for _ in range(5):
        latest = session.scalar(select(func.max(Model.version)).where(Model.name == name)) or 0
        try:
            with session.begin_nested():
                row = _model_row(name, latest + 1, kind, uri, backend, revision, digest, queue, defaults, lineage)
                session.add(row)
            return ModelRef.from_row(row)
        except IntegrityError:
            continue
    raise SpecError(f"could not register a new version of {name!r}: too many registrations at once")


def register_checked(session: Session, name: str, kind: str, uri: str, *, endpoint_url: str | None = None,
                     **kw: Any) -> ModelRef:
    """``aigc models register`` and ``Client.register_model``: ``register`` after refusing, in one line and
    with nothing written, a model the workers could not run: a URI scheme ``materialize`` cannot fetch,
    a missing directory or S3 prefix, a config.json (model_index.json) whose architecture the backend
    does not run, weights that are not safetensors, or defaults outside the backend's parameters. An
    s3:// model gets its digest now (unless ``digest`` is given), as a file:// one does; the checkpoint's
    model_type and context length are recorded in its defaults."""
    return register(session, name, kind, uri, **checked_registration(name, kind, uri, endpoint_url=endpoint_url, **kw))


def checked_registration(name: str, kind: str, uri: str, *, endpoint_url: str | None = None,
                         **kw: Any) -> dict[str, Any]:
    """The checks of ``register_checked``, nothing written: ``register``'s keyword arguments, with the
    digest and the defaults completed, or a SpecError."""
    if kind not in KINDS:
        raise SpecError(f"model {name!r}: kind must be one of {', '.join(KINDS)}")
    check_model_name(name)
    defaults = kw.pop("defaults", None)
    check_defaults(name, defaults)
    facts, digest = inspect_model(name, kind, uri, backend=kw.get("backend"), digest=kw.pop("digest", None),
                                  endpoint_url=endpoint_url)
    defaults = {**facts, **(defaults or {})}
    backend = kw.get("backend") or DEFAULT_BACKEND[kind]
    schema = params_schema(kind, backend, defaults.get("model_type"))
    try:
        effective_params(kind, generation_defaults(defaults), where="defaults", schema=schema)
    except SpecError as e:
        raise SpecError(f"model {name!r}: {e}") from None
    return {**kw, "digest": digest, "defaults": defaults}


def inspect_model(name: str, kind: str, uri: str, *, backend: str | None, digest: str | None,
                  endpoint_url: str | None) -> tuple[dict[str, Any], str | None]:
    """The checkpoint's facts (model_type, context length) and its digest, or a SpecError saying why
    the model cannot be registered."""
    from aigc_models.base import BACKENDS  # torch-free: the table of backend names
    from aigc_models.params import BY_ARCHITECTURE

    parsed = urlparse(uri)
    if parsed.scheme not in FETCHABLE:
        hint = ": download it and register its directory (file://) or an S3 copy" if parsed.scheme == "hf" else ""
        shown = f"{parsed.scheme}://" if parsed.scheme else "a path without a scheme"
        raise SpecError(f"model {name!r}: {uri!r}: models are fetched from file://, s3:// or builtin:// URIs, "
                        f"not {shown}{hint}")
    backend = backend or DEFAULT_BACKEND[kind]
    known = backend in BACKENDS  # a plugin backend (AIGC_BACKENDS) reads its directory its own way
    if parsed.scheme == "builtin":
        if known and backend not in BUILTIN_BACKENDS:
            raise SpecError(f"model {name!r}: the {backend} backend has no built-in models (builtin:// is for "
                            f"{', '.join(BUILTIN_BACKENDS)})")
        return {}, digest
    store = None
    if parsed.scheme == "file":
        path = local_path(uri)
        if not path.is_dir():
            raise SpecError(f"model {name!r}: model directory {path} does not exist")
        ck = local_checkpoint(path)
    else:
        from aigc_core.storage import S3Store

        if not parsed.netloc:
            raise SpecError(f"model {name!r}: {uri!r}: name the bucket, s3://bucket/prefix/")
        store = S3Store(parsed.netloc, parsed.path.strip("/"), endpoint_url=endpoint_url)
        try:
            ck = s3_checkpoint(store, uri)
        except StorageError as e:
            raise SpecError(f"model {name!r}: cannot list {uri}: {e.__cause__ or e}") from None
        if not ck.names:
            raise SpecError(f"model {name!r}: nothing under {uri}: no such prefix")
    try:
        if known:
            check_checkpoint(backend, ck, {b: tuple(archs) for b, archs in BY_ARCHITECTURE.items()})
        if store is None:  # a local directory: its weights' headers are read too (an S3 copy's, when fetched)
            check_local_weights(local_path(uri), ck.names)
    except SpecError as e:
        raise SpecError(f"model {name!r}: {e}") from None
    if store is not None and digest is None:
        try:
            digest = s3_digest(store, ck.names)
        except Exception as e:  # botocore's own errors: a read that fails while hashing
            raise SpecError(f"model {name!r}: cannot read {uri} to hash it: {e}") from None
    return read_facts(kind, ck), digest


def model_facts(ref: ModelRef) -> ModelFacts:
    """What submit checks a job against: the facts recorded at registration (for a file:// model
    registered before they were, read from its config.json now) and its tokenizer.json if local."""
    facts = {k: ref.defaults[k] for k in CHECKPOINT_FACTS if k in ref.defaults}
    tokenizer = None
    if ref.uri.startswith("file://") and (path := local_path(ref.uri)).is_dir():
        if len(facts) < len(CHECKPOINT_FACTS):
            facts = {**read_facts(ref.kind, _config_only(path)), **facts}
        tokenizer = path / "tokenizer.json"
    return ModelFacts(ref.tag, ref.kind, ref.backend, facts.get("model_type"), facts.get("context_length"),
                      tokenizer, generation_defaults(ref.defaults))


def check_job_fits(spec: JobSpec, ref: ModelRef) -> None:
    """The job's parameters in its model's contract and its text items within the model's context."""
    check_model_fit(spec, model_facts(ref))


def _config_only(path: Path) -> Checkpoint:
    """A local checkpoint read for its config.json alone (no listing of a large directory)."""
    return Checkpoint(str(path), (), lambda n: (path / n).read_bytes() if (path / n).is_file() else None)


# Model defaults that set up the worker rather than the generation: the dtype the weights load in,
# the micro-batch size (items per generate call) for this model, over AIGC_MICRO_BATCH_SIZE, and a
# chat template (Jinja) for a checkpoint that has none of its own, or to use instead of its own.
WORKER_DEFAULTS = ("dtype", "micro_batch_size", "chat_template")
# What registration read from the checkpoint's config.json and records with the entry, so the submit
# side knows it without the weights (an s3:// model's too): its model_type and its context length.
CHECKPOINT_FACTS = ("model_type", "context_length")
MAX_MICRO_BATCH = 4096


def generation_defaults(defaults: dict[str, Any] | None) -> dict[str, Any]:
    """A model's defaults that are generation parameters (merged under the job's and the item's)."""
    return {k: v for k, v in (defaults or {}).items() if k not in WORKER_DEFAULTS + CHECKPOINT_FACTS}


def user_defaults(defaults: dict[str, Any] | None) -> dict[str, Any]:
    """A model's defaults as its registration gave them, without the facts read from its checkpoint."""
    return {k: v for k, v in (defaults or {}).items() if k not in CHECKPOINT_FACTS}


def check_defaults(name: str, defaults: dict[str, Any] | None) -> None:
    ctx = (defaults or {}).get("context_length")
    if ctx is not None and (isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 1):
        raise SpecError(f"model {name!r}: defaults.context_length must be a whole number of tokens, not {ctx!r}")
    template = (defaults or {}).get("chat_template")
    if template is not None and (not isinstance(template, str) or not template.strip()):
        raise SpecError(f"model {name!r}: defaults.chat_template must be a Jinja template (text)")
    mbs = (defaults or {}).get("micro_batch_size")
    if mbs is not None and (isinstance(mbs, bool) or not isinstance(mbs, int) or not 1 <= mbs <= MAX_MICRO_BATCH):
        raise SpecError(f"model {name!r}: defaults.micro_batch_size must be a whole number from 1 to "
                        f"{MAX_MICRO_BATCH}, not {mbs!r}")


def has_chat_template(ref: ModelRef) -> bool | None:
    """Whether ``messages`` items can be rendered for this model: True when its registry entry
    supplies ``defaults.chat_template`` or its file:// checkpoint has a template of its own, False when
    the checkpoint is a local directory without one, None when that cannot be told without fetching
    the model (s3://, hf://): the worker then refuses such items if it finds none."""
    if ref.defaults.get("chat_template"):
        return True
    if not ref.uri.startswith("file://"):
        return None
    path = local_path(ref.uri)
    return checkpoint_chat_template(path) is not None if path.is_dir() else None


def checkpoint_chat_template(path: Path) -> str | None:
    """The chat template a checkpoint directory carries, read without transformers: the
    ``chat_template.jinja`` file, ``chat_template.json`` or the ``chat_template`` entry of
    ``tokenizer_config.json`` (a string, or a list of named templates of which "default" is used)."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8") or None
    for name in ("chat_template.json", "tokenizer_config.json"):
        try:
            data = json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        template = data.get("chat_template") if isinstance(data, dict) else None
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if isinstance(template, str) and template:
            return template
    return None


MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_model_name(name: str) -> str:
    """Names become cache paths and object keys: letters, digits, '.', '_' and '-' only."""
    if not MODEL_NAME.match(name or "") or ".." in name:
        raise SpecError(f"model name {name!r}: use letters, digits, '.', '_' and '-' (at most 128), no '@'")
    return name


def _model_row(name, version, kind, uri, backend, revision, digest, queue, defaults, lineage) -> Model:
    return Model(
        name=name,
        version=version,
        kind=kind,
        backend=backend or DEFAULT_BACKEND.get(kind, kind),
        uri=uri,
        revision=revision,
        digest=digest,
        queue=queue or kind,
        defaults=defaults or {},
        lineage=lineage or {},
    )


BUILTIN_MODELS = Path(__file__).with_name("builtin_models.yaml")


def sync_models_file(session: Session, path: str | Path, *, only_missing: bool = False,
                     endpoint_url: str | None = None) -> list[ModelRef]:
    """Register every models.yaml entry that differs from the newest version of its name (URI,
    revision, digest, backend, queue or defaults); with ``only_missing``, only names the registry does
    not know at all. A new or changed entry goes through the checks of ``aigc models register``
    (``register_checked``); one the workers could not run is a SpecError naming the file and the
    entry, and nothing of the file is registered (every entry is checked before the first is
    written). An unchanged entry is not read again."""
    refs: list[ModelRef | tuple[str, str, str, dict[str, Any]]] = []
    for entry in _models_file_entries(path):
        name, uri = entry["name"], os.path.expandvars(entry["uri"])
        current = session.scalars(
            select(Model).where(Model.name == name).order_by(Model.version.desc()).limit(1)
        ).first()
        if current and only_missing:
            refs.append(ModelRef.from_row(current))
            continue
        digest = entry.get("digest")
        same_place = current is not None and (current.uri, current.revision) == (uri, entry.get("revision"))
        kind = entry["kind"]
        setup = (current.kind, current.backend, current.queue, user_defaults(current.defaults)) if current else None
        same_setup = setup is not None and setup == (
            kind, entry.get("backend") or DEFAULT_BACKEND.get(kind, kind), entry.get("queue") or kind,
            user_defaults(entry.get("defaults")))
        if current is not None and same_place and same_setup and digest in (None, current.digest):
            # Unchanged entry: no re-hashing of the weights at every client start. A directory
            # rewritten in place needs a new revision (or `aigc models register`); a change of
            # backend, queue or defaults alone makes a new version too.
            refs.append(ModelRef.from_row(current))
            continue
        if current is not None and same_place and digest is None:
            digest = current.digest  # the same weights: no need to hash them again
        try:
            refs.append((name, kind, uri, checked_registration(
                name, kind, uri, endpoint_url=endpoint_url, backend=entry.get("backend"),
                revision=entry.get("revision"), digest=digest, queue=entry.get("queue"),
                defaults=entry.get("defaults"))))
        except SpecError as e:
            raise SpecError(f"{path}: {e}") from None
    return [r if isinstance(r, ModelRef) else register(session, r[0], r[1], r[2], **r[3]) for r in refs]


class _ModelEntry(BaseModel):
    """One entry of models.yaml."""

    model_config = ConfigDict(extra="forbid")

    name: str
    kind: str
    uri: str
    backend: str | None = None
    revision: str | None = None
    digest: str | None = None
    queue: str | None = None
    defaults: dict[str, Any] | None = None


def _models_file_entries(path: str | Path) -> list[dict[str, Any]]:
    """The entries of a models.yaml, each checked, or a SpecError naming the file and the entry."""
    data = load_yaml(Path(path)) or {}
    entries = data.get("models", []) if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise SpecError(f"{path}: expected 'models:' with a list of models")
    out: list[dict[str, Any]] = []
    for i, raw in enumerate(entries):
        if not isinstance(raw, dict):
            raise SpecError(f"{path}: models[{i}]: expected a mapping with name, kind and uri")
        try:
            entry = _ModelEntry.model_validate(raw).model_dump()
        except ValidationError as e:
            raise SpecError(f"{path}: models[{i}]: {format_validation_error(e)}") from None
        if any(e["name"] == entry["name"] for e in out):  # each would be compared with the same row
            raise SpecError(f"{path}: models[{i}]: {entry['name']!r} is named twice; one entry per model")
        out.append(entry)
    return out


def list_models(session: Session) -> list[Model]:
    return list(session.scalars(select(Model).order_by(Model.name, Model.version)))


def local_path(uri: str) -> Path:
    return Path(os.path.expanduser(uri.removeprefix("file://"))).resolve()


def dir_digest(path: Path) -> str:
    """sha256 over every file's relative path and content: the weights digest in provenance."""
    if not path.is_dir():
        raise ModelLoadError(f"model directory {path} does not exist")
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(p.relative_to(path).as_posix().encode() + b"\0")
        h.update(_file_sha256(p).encode() + b"\n")
    return "sha256:" + h.hexdigest()


def _file_sha256(p: Path) -> str:
    h = hashlib.sha256()
    with p.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# The URI schemes ``materialize`` fetches (registration refuses any other): a local directory, an S3
# prefix, and the built-in models their backends make themselves.
FETCHABLE = ("file", "s3", "builtin")
BUILTIN_BACKENDS = ("espeak", "digits")


def materialize(ref: ModelRef, cache_dir: Path, *, endpoint_url: str | None = None) -> Path | str:
    """A local directory holding the model: file:// as is, s3:// fetched once into the cache and checked."""
    parsed = urlparse(ref.uri)
    if parsed.scheme == "file":
        path = local_path(ref.uri)
        if not path.is_dir():
            raise ModelLoadError(f"{ref.tag}: model directory {path} does not exist")
        return path
    if parsed.scheme == "s3":
        return _fetch_s3(ref, parsed.netloc, parsed.path.strip("/"), cache_dir, endpoint_url)
    if parsed.scheme in ("builtin", "hf"):
        return ref.uri  # the backend resolves these itself
    raise ModelLoadError(f"{ref.tag}: unsupported model URI {ref.uri!r}")


def _fetch_s3(ref: ModelRef, bucket: str, prefix: str, cache_dir: Path, endpoint_url: str | None) -> Path:
    final = cache_dir / "models" / ref.name / str(ref.version)
    final.parent.mkdir(parents=True, exist_ok=True)
    # One GPU process per device on a host: the first fetches and checks, the others wait for it.
    with _file_lock(final.parent / f".{ref.version}.lock"):
        verified = final / ".verified"
        if final.is_dir() and verified.exists() and verified.read_text() == str(ref.digest):
            return final
        path = _download_checked(ref, bucket, prefix, final, endpoint_url)
        (path / ".verified").write_text(str(ref.digest))
        return path


@contextmanager
def _file_lock(path: Path):
    import fcntl

    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _download_checked(ref: ModelRef, bucket: str, prefix: str, final: Path, endpoint_url: str | None) -> Path:
    from aigc_core.storage import S3Store

    store = S3Store(bucket, prefix, endpoint_url=endpoint_url)
    tmp = final.with_name(f".{ref.version}.{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    keys = list(store.list(""))
    if not keys:
        raise ModelLoadError(f"{ref.tag}: nothing under {ref.uri}")
    for key in keys:
        store.download(key, safe_join(tmp, key))
    if ref.digest and dir_digest(tmp) != ref.digest:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelLoadError(f"{ref.tag}: digest of {ref.uri} does not match the registry")
    shutil.rmtree(final, ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, final)
    return final


def safe_join(root: Path, key: str) -> Path:
    """``root / key`` for a key read from a listing: refused if it is not a plain relative key."""
    from aigc_core.storage import check_key

    path = (root / check_key(key)).resolve()
    if not path.is_relative_to(root.resolve()):
        raise SpecError(f"object key {key!r} leaves {root}")
    return path


def find_model(session: Session, name: str) -> list[Model]:
    rows = list(session.scalars(select(Model).where(Model.name == name).order_by(Model.version)))
    if not rows:
        raise NotFound(f"unknown model {name!r}")
    return rows
