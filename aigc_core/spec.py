"""The job spec: what a user submits, validated before anything is written."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from aigc_core.errors import NotFound, SpecError
from aigc_core.settings import Limits, Settings

Kind = Literal["text", "image", "audio"]
KINDS: tuple[str, ...] = ("text", "image", "audio")


# Each backend's parameters are declared once, in aigc_models/params.py (torch-free; see its docstring for
# why there): imported lazily, so importing the spec costs nothing more. TextParams, ImageParams,
# AudioParams and PARAMS_BY_KIND stay importable from here.
_LAZY_PARAMS = {"TextParams": "TextParams", "ImageParams": "ImageParams", "AudioParams": "AudioParams",
                "PARAMS_BY_KIND": "BY_KIND"}


def __getattr__(name: str) -> Any:
    if name in _LAZY_PARAMS:
        from aigc_models import params

        return getattr(params, _LAZY_PARAMS[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def params_schema(kind: str, backend: str | None = None, model_type: str | None = None) -> type[BaseModel]:
    """The parameter contract a job is validated against: the model's architecture's (hf-tts), its
    backend's, else (a backend named in AIGC_BACKENDS, or no model yet) every parameter of its kind."""
    from aigc_models.params import params_for

    if kind not in KINDS:
        raise SpecError(f"kind {kind!r} has no generation backend yet")
    return params_for(backend or "", kind, model_type)


@dataclass(frozen=True)
class ModelFacts:
    """What the submit side knows of a model without loading it: its backend, the checkpoint's
    model_type and context length (recorded at registration, or read from a local config.json), and a
    local tokenizer.json to count prompt tokens with (None: not at hand, e.g. an s3:// model)."""

    tag: str
    kind: str
    backend: str
    model_type: str | None = None
    context_length: int | None = None
    tokenizer_file: Path | None = None
    defaults: dict[str, Any] = field(default_factory=dict)


class SourceRef(BaseModel):
    """An item whose input is another job's text output, read when the item runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job: str = Field(min_length=1, max_length=32)
    custom_id: str = Field(min_length=1, max_length=128)


class ChatMessage(BaseModel):
    """One message of a chat item, in OpenAI's chat shape."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant"]
    content: str


class ItemSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    custom_id: str | None = None
    prompt: str = ""
    text: str | None = None  # audio items may say "text"; it is the prompt
    # A chat item: rendered by the model's chat template in the worker, instead of a raw prompt.
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=1000)
    source: SourceRef | None = Field(None, alias="from")
    params: dict[str, Any] = Field(default_factory=dict)

    @property
    def input_text(self) -> str:
        return self.text if self.text is not None else self.prompt

    @field_validator("custom_id")
    @classmethod
    def _custom_id(cls, v: str | None) -> str | None:
        if v is not None and (not v or not v.isprintable()):
            raise ValueError("custom_id must be a non-empty printable string")
        return v


class JobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Kind
    model: str = Field(min_length=1, max_length=160)
    items: list[ItemSpec]
    params: dict[str, Any] = Field(default_factory=dict)
    seed: int | None = Field(None, ge=0, lt=2**62)
    idempotency_key: str | None = Field(None, min_length=1, max_length=200)
    metadata: dict[str, Any] = Field(default_factory=dict)
    chunk_size: int | None = Field(None, ge=1, le=10_000)
    after: list[str] = Field(default_factory=list, max_length=16)
    # A system message put in front of every chat item (one with messages, or a "from" item) that does
    # not begin with its own.
    system: str | None = Field(None, min_length=1)
    # Reuse identical work: an item whose weights digest, effective parameters, rendered prompt and seed
    # equal an earlier succeeded item's refers to that output (worker/reuse.py). Off by default.
    reuse: bool = False
    _digest: str | None = PrivateAttr(default=None)

    @field_validator("after", mode="before")
    @classmethod
    def _after(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else (v or [])

    def payload_digest(self) -> str:
        """What the idempotency key protects: everything but the key itself (computed once)."""
        if self._digest is None:
            body = self.model_dump(mode="json", exclude={"idempotency_key"}, by_alias=True)
            # Fields added later are left out while unset, so a job's digest does not change with them.
            if body["system"] is None:
                del body["system"]
            if not body["reuse"]:
                del body["reuse"]
            for item in body["items"]:
                if item["messages"] is None:
                    del item["messages"]
            raw = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
            self._digest = hashlib.sha256(raw.encode()).hexdigest()
        return self._digest


def load_yaml(path: Path, limits: Limits | None = None) -> Any:
    """A YAML (or JSON) file the user wrote, or a SpecError naming the file and the first problem.

    The file is refused by its size before it is read, and by its shape after: nesting deeper than
    the limit, or aliases that expand it far beyond its size (a "billion laughs" file), are errors.
    """
    import yaml

    limits = limits or Limits()
    try:
        with open(path, "rb") as f:
            raw = f.read(limits.max_yaml_file_bytes + 1)
    except OSError as e:
        raise SpecError(f"{path}: {e.strerror}") from None
    if len(raw) > limits.max_yaml_file_bytes:
        raise SpecError(f"{path}: larger than the limit of {limits.max_yaml_file_bytes} bytes "
                        "(AIGC_LIMIT_MAX_YAML_FILE_BYTES); put the items in an items_file")
    try:
        data = yaml.load(raw.decode("utf-8"), Loader=_json_loader())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise SpecError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise SpecError(f"{path}: nested too deeply") from None
    check_shape(data, max_depth=limits.max_nesting_depth, max_nodes=2 * len(raw) + 10_000, where=str(path))
    return data


# A float with an exponent and no dot, or an unsigned exponent (YAML 1.2's core schema): what 1.1 misses.
_EXP_FLOAT = re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+]?[0-9]+$")


def parse_scalar(text: str) -> Any:
    """A value typed on a command line (``-p NAME=VALUE``), read as a YAML scalar: ``5e-4`` and
    ``0.8`` are floats, ``20`` an int, ``true`` a bool, ``null`` None, ``'20'`` the text 20. Anything
    else, including what YAML would read as a mapping or a list (``Headline: x``), stays the text."""
    import yaml

    try:
        value = yaml.load(text, Loader=_json_loader())
    except (yaml.YAMLError, RecursionError):
        return text
    return value if value is None or isinstance(value, (str, int, float, bool)) else text


@functools.cache
def _json_loader():
    """yaml.SafeLoader, less what JSON cannot carry: a date stays the text it was written as, and
    ``!!binary`` and ``!!set`` are refused (they would fail later, when the job is stored)."""
    import yaml

    class JsonSafeLoader(yaml.SafeLoader):
        pass

    def refuse(loader, node):
        raise yaml.constructor.ConstructorError(None, None, f"{node.tag} values are not allowed", node.start_mark)

    def as_text(loader, node):
        return yaml.SafeLoader.construct_yaml_str(loader, node)

    JsonSafeLoader.add_constructor("tag:yaml.org,2002:timestamp", as_text)
    # YAML 1.1 (PyYAML) reads 5e-4 and 1E5 as text; YAML 1.2, JSON and every user read them as numbers.
    JsonSafeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _EXP_FLOAT, list("-+0123456789."))
    for tag in ("binary", "set"):
        JsonSafeLoader.add_constructor(f"tag:yaml.org,2002:{tag}", refuse)
    return JsonSafeLoader


def check_shape(data: Any, *, max_depth: int, max_nodes: int, where: str) -> None:
    """Refuse values nested deeper than ``max_depth`` or with more than ``max_nodes`` values in all,
    counting a value each time it is reached (YAML aliases share one object between many places)."""
    stack = [(data, 0)]
    nodes = 0
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > max_nodes:
            raise SpecError(f"{where}: expands to more than {max_nodes} values (YAML aliases?)")
        if isinstance(value, dict):
            children = [*value.keys(), *value.values()]
        elif isinstance(value, (list, tuple, set)):
            children = list(value)
        else:
            continue
        if depth >= max_depth and children:
            raise SpecError(f"{where}: nested deeper than {max_depth} levels")
        stack.extend((c, depth + 1) for c in children)


MAX_LINE_BYTES = 1024 * 1024  # one item's JSON: a prompt within the limit and its params fit easily


def load_items_jsonl(path: Path, limits: Limits | None = None, *, name: str | None = None) -> list[dict[str, Any]]:
    """One ``{"custom_id", "prompt", "params"?}`` per line; errors name the line (and the file as
    ``name``, when it was fetched from somewhere else, else its path).

    Streamed with bounded memory: a file over ``max_items_file_bytes`` is refused before it is read,
    and one with more than ``max_items_per_job`` items after counting its lines, before any is parsed.
    """
    limits = limits or Limits()
    shown = name or Path(path)
    f, size = _open_items(Path(path), shown, limits)
    with f:
        if size is not None:  # a regular file: count first, so a huge one costs no memory
            _count_items(f, shown, limits)
            f.seek(0)
        return [_parse_item_line(raw, n, shown, limits) for n, raw in _item_lines(f, shown, limits)]


def iter_items_jsonl(path: Path | str, limits: Limits | None = None) -> Iterator[dict[str, Any]]:
    """The items of a JSONL file one at a time, for a job written as it is read (scheduler/bulk.py):
    the same checks as ``load_items_jsonl``, without holding the items."""
    limits = limits or Limits()
    f, _ = _open_items(Path(path), path, limits)
    with f:
        for n, raw in _item_lines(f, path, limits):
            yield _parse_item_line(raw, n, path, limits)


def _open_items(path: Path, shown: Path | str, limits: Limits):
    """The file, open, and its size; one over ``max_items_file_bytes`` is refused before it is read."""
    try:
        f = path.open("rb")
    except OSError as e:
        raise SpecError(f"{shown}: {e.strerror}") from None
    size = _file_size(f)
    if size is not None and size > limits.max_items_file_bytes:
        f.close()
        raise SpecError(f"{shown}: {size} bytes is over the limit of {limits.max_items_file_bytes} "
                        "(AIGC_LIMIT_MAX_ITEMS_FILE_BYTES); split the job")
    return f, size


def items_file_location(ref: Any, *, settings: Settings | None, base_dir: Path | None = None) -> Path | str:
    """Where an items file named in a job file or a schedule may be read, by one rule for both: a
    local path (relative to ``base_dir``, the folder of the file that names it) or ``file:///path``
    as a Path; ``s3://bucket/key`` as it is, if the bucket is the storage bucket (AIGC_STORAGE_URL) or
    one AIGC_ITEMS_FILE_BUCKETS names (``settings`` says which; only local paths need none).
    Anything else is a SpecError, before anything is read."""
    if isinstance(ref, Path):
        return ref if ref.is_absolute() or base_dir is None else base_dir / ref
    if not isinstance(ref, str) or not ref.strip():
        raise SpecError("items_file must be the path or s3:// URI of a JSONL file")
    scheme, sep, rest = ref.partition("://")
    if not sep or scheme.lower() == "file":
        return items_file_location(Path(rest if sep else ref), settings=settings, base_dir=base_dir)
    parts = urlsplit(ref)
    if scheme.lower() != "s3" or not parts.netloc or not parts.path.strip("/"):
        raise SpecError(f"items_file {ref!r}: use a local path, file:///path or s3://bucket/key")
    if settings is None:
        raise ValueError("an s3:// items_file is checked against settings: pass them")
    allowed = items_file_buckets(settings)
    if parts.netloc not in allowed:
        store = urlsplit(settings.storage_url)
        storage = f"the storage bucket {store.netloc!r}" if store.scheme == "s3" else \
            "the storage bucket (none: AIGC_STORAGE_URL is not s3://)"
        extra = ", ".join(sorted(allowed - {store.netloc})) or "none"
        raise SpecError(f"items_file {ref}: bucket {parts.netloc!r} is not allowed: items files are read from "
                        f"{storage} and the buckets AIGC_ITEMS_FILE_BUCKETS names ({extra}); add it there to "
                        "allow it")
    return ref


def items_file_buckets(settings: Settings) -> set[str]:
    """The buckets items files may be read from: the storage bucket and AIGC_ITEMS_FILE_BUCKETS."""
    allowed = {b.strip() for b in (settings.items_file_buckets or "").split(",") if b.strip()}
    store = urlsplit(settings.storage_url)
    if store.scheme == "s3" and store.netloc:
        allowed.add(store.netloc)
    return allowed


def read_items_file(ref: Any, *, settings: Settings, base_dir: Path | None = None) -> list[dict[str, Any]]:
    """The items of an items file allowed by ``items_file_location``; an s3:// one is fetched now."""
    import tempfile

    from aigc_core import storage

    location = items_file_location(ref, settings=settings, base_dir=base_dir)
    if isinstance(location, Path):
        if not location.exists():
            raise SpecError(f"items_file {location} does not exist")
        return load_items_jsonl(location, settings.limits)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = storage.download_uri(location, Path(tmp) / "items.jsonl", endpoint_url=settings.s3_endpoint_url)
        except NotFound:
            raise SpecError(f"items_file {location} does not exist") from None
        return load_items_jsonl(path, settings.limits, name=location)


def _file_size(f) -> int | None:
    st = os.fstat(f.fileno())
    return st.st_size if stat.S_ISREG(st.st_mode) else None  # a pipe or device: counted while read


def _item_lines(f, path: Path | str, limits: Limits):
    """(line number, bytes) of each non-blank line, refusing over-long lines, too many bytes or items."""
    total = items = 0
    n = 0
    while True:
        raw = f.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        n += 1
        total += len(raw)
        if total > limits.max_items_file_bytes:
            raise SpecError(f"{path}: more than {limits.max_items_file_bytes} bytes, over the limit "
                            "(AIGC_LIMIT_MAX_ITEMS_FILE_BYTES); split the job")
        if len(raw) > MAX_LINE_BYTES:
            raise SpecError(f"{path} line {n}: longer than {MAX_LINE_BYTES} bytes")
        if not raw.strip():
            continue
        items += 1
        if items > limits.max_items_per_job:
            raise SpecError(f"{path}: more than {limits.max_items_per_job} items, over the limit of "
                            f"{limits.max_items_per_job} per job (AIGC_LIMIT_MAX_ITEMS_PER_JOB)")
        yield n, raw


def _count_items(f, path: Path | str, limits: Limits) -> None:
    for _ in _item_lines(f, path, limits):
        pass


def _parse_item_line(raw: bytes, n: int, path: Path | str, limits: Limits) -> dict[str, Any]:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError(f"{path} line {n}: not UTF-8 text") from None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise SpecError(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise SpecError(f"{path} line {n}: nested too deeply") from None
    if not isinstance(obj, dict):
        raise SpecError(f"{path} line {n}: expected a JSON object, got {type(obj).__name__}")
    check_shape(obj, max_depth=limits.max_nesting_depth, max_nodes=MAX_LINE_BYTES, where=f"{path} line {n}")
    if "text" in obj and "prompt" not in obj and "from" not in obj:
        obj["prompt"] = obj.pop("text")
    return obj


def check_items_container(items: Any, where: str = "items") -> None:
    """Items come as a list (or another iterable) of items. A str, bytes or a mapping is iterable
    too, but is never a list of items: "prompt" would make six one-letter jobs, a dict its keys."""
    if isinstance(items, (str, bytes, bytearray, Mapping)) or not isinstance(items, Iterable):
        raise SpecError(f"{where}: expected a list of items (mappings like {{\"prompt\": ...}} or prompt "
                        f"strings), got {type(items).__name__}; wrap a single item in a list")


def check_item_count(n: int, limits: Limits) -> None:
    """Cheap and first: a million items are refused before any of them is validated."""
    if n > limits.max_items_per_job:
        raise SpecError(f"items: {n} items is over the limit of {limits.max_items_per_job} per job")


def parse_spec(data: Any) -> JobSpec:
    """Validate raw JSON-like data into a JobSpec, or raise SpecError naming the field."""
    if not isinstance(data, dict):
        raise SpecError(f"a job spec must be a mapping, got {type(data).__name__}")
    try:  # every string, keys too, must encode as UTF-8: the database and the digest need it
        json.dumps(data, ensure_ascii=False, default=str).encode()
    except UnicodeEncodeError as e:
        raise SpecError(f"text that is not valid Unicode (a lone surrogate such as {e.object[e.start:e.end]!a})"
                        ) from None
    except (ValueError, TypeError, RecursionError):
        pass  # not JSON-shaped: validation says what is wrong
    if "items" in data:
        check_items_container(data["items"])
    try:
        return JobSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(format_validation_error(e)) from None


def format_validation_error(e: ValidationError, prefix: str = "") -> str:
    parts = []
    for err in e.errors()[:5]:
        loc = prefix + ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        parts.append(f"{loc}: {msg}" if loc else msg)
    more = len(e.errors()) - 5
    if more > 0:
        parts.append(f"... and {more} more")
    return "; ".join(parts)


def effective_params(kind: str, *layers: dict[str, Any], where: str = "params",
                     schema: type[BaseModel] | None = None) -> BaseModel:
    """Merge parameter layers (model defaults, job, item) and validate the result against ``schema``
    (default: every parameter of the kind)."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(layer or {})
    schema = schema or params_schema(kind)
    try:
        return schema.model_validate(merged)
    except ValidationError as e:
        raise SpecError(format_validation_error(e, prefix=f"{where}.")) from None


def check_limits(spec: JobSpec, limits: Limits, model_defaults: dict[str, Any]) -> None:
    """Everything that can be refused at submit is refused here, before any write."""
    n = len(spec.items)
    if n == 0:
        raise SpecError("items: a job needs at least one item")
    check_item_count(n, limits)
    meta_bytes = len(json.dumps(spec.metadata, default=str).encode())
    if meta_bytes > limits.max_metadata_bytes:
        raise SpecError(f"metadata: {meta_bytes} bytes is over the limit of {limits.max_metadata_bytes}")
    job_params = effective_params(spec.kind, model_defaults, spec.params)  # errors name "params"
    # The job's params are checked once; an item's only when it has its own (a million items with
    # none would otherwise re-check the same values a million times: a streamed submit's hot loop).
    _check_param_limits(spec.kind, job_params, limits, "params")
    seen: dict[str, int] = {}
    for i, item in enumerate(spec.items):
        cid = item.custom_id if item.custom_id is not None else str(i)
        if len(cid) > limits.max_custom_id_chars:
            raise SpecError(f"items[{i}].custom_id: longer than {limits.max_custom_id_chars} characters")
        if cid in seen:
            raise SpecError(f"items[{i}].custom_id: {cid!r} duplicates items[{seen[cid]}]")
        seen[cid] = i
        if item.text is not None and item.prompt:
            raise SpecError(f"items[{i}]: give text or prompt, not both")
        if item.source is not None and item.input_text:
            raise SpecError(f"items[{i}]: an item with 'from' takes its text from that job; give no prompt")
        _check_chat(spec, i, item)
        if item.source is None and item.messages is None and not item.input_text and spec.kind != "image":
            raise SpecError(f"items[{i}].prompt: a {spec.kind} item needs a prompt (or 'messages', or 'from')")
        messages = chat_messages(spec, item)
        size = len(item.input_text.encode()) + sum(len(m["content"].encode()) for m in messages or [])
        if size > limits.max_prompt_bytes:
            raise SpecError(f"items[{i}].prompt: {size} bytes is over the limit of {limits.max_prompt_bytes}")
        if spec.kind == "audio" and len(item.input_text) > limits.max_tts_chars:
            raise SpecError(f"items[{i}].text: {len(item.input_text)} characters is over the limit of "
                            f"{limits.max_tts_chars} for speech")
        if item.params:
            p = effective_params(spec.kind, model_defaults, spec.params, item.params, where=f"items[{i}].params")
            _check_param_limits(spec.kind, p, limits, f"items[{i}].params")


def _check_chat(spec: JobSpec, i: int, item: ItemSpec) -> None:
    if spec.kind != "text" and (spec.system is not None or item.messages is not None):
        raise SpecError(f"items[{i}].messages: chat messages and 'system' are for text jobs, not {spec.kind}")
    if item.messages is not None and (item.prompt or item.text is not None):
        raise SpecError(f"items[{i}]: give messages or prompt, not both")
    if spec.system is not None and item.messages is None and item.source is None:
        raise SpecError(f"items[{i}]: a job with 'system' takes chat items ('messages' or 'from'), not a raw prompt")


def chat_messages(spec: JobSpec, item: ItemSpec) -> list[dict[str, str]] | None:
    """The messages an item is rendered from (None for a raw-prompt item): its own, with the job's
    ``system`` in front unless they begin with a system message of their own. A ``from`` item of a
    job with ``system`` is a chat item too: the worker adds the source text as the user message."""
    if item.messages is None and (spec.system is None or item.source is None):
        return None
    own = [m.model_dump() for m in item.messages or []]
    if spec.system is not None and not (own and own[0]["role"] == "system"):
        own.insert(0, {"role": "system", "content": spec.system})
    return own


def _check_param_limits(kind: str, p: BaseModel, limits: Limits, where: str) -> None:
    # Unset max_new_tokens takes the project default (128), which is under any sane limit.
    tokens = getattr(p, "max_new_tokens", None)
    if kind == "text" and tokens is not None and tokens > limits.max_new_tokens:
        raise SpecError(f"{where}.max_new_tokens: {tokens} is over the limit of {limits.max_new_tokens}")
    duration = getattr(p, "duration", None)
    if kind == "audio" and duration is not None and duration > limits.max_audio_seconds:
        raise SpecError(f"{where}.duration: {duration:g} s is over the limit of {limits.max_audio_seconds:g} s "
                        "(AIGC_LIMIT_MAX_AUDIO_SECONDS)")
    steps = getattr(p, "num_inference_steps", None)
    if kind == "image" and steps is not None and steps > limits.max_inference_steps:
        raise SpecError(f"{where}.num_inference_steps: {steps} is over the limit of {limits.max_inference_steps}")
    height, width = getattr(p, "height", None), getattr(p, "width", None)
    pixels = (height or 0) * (width or 0)
    if kind == "image" and pixels > limits.max_image_pixels:
        raise SpecError(f"{where}: {width}x{height} is {pixels} pixels, over the limit of {limits.max_image_pixels}")


def check_model_fit(spec: JobSpec, facts: ModelFacts) -> None:
    """The job against its model, before any write: every parameter (registry defaults, job, item)
    in the model's own contract (its backend's, or its architecture's), and each text item's prompt
    tokens plus ``max_new_tokens`` within the model's context. Prompt tokens are counted with the
    ``tokenizers`` library (no torch) when the model's tokenizer.json is local; a chat item counts its
    messages' text (its template adds a few tokens more: the worker checks the exact count); an item
    ``from`` another job, or a model whose tokenizer is not at hand, checks ``max_new_tokens`` alone."""
    schema = params_schema(spec.kind, facts.backend, facts.model_type)
    what = f"model {facts.tag} ({facts.backend}{'/' + facts.model_type if facts.model_type else ''})"
    try:
        job_params = effective_params(spec.kind, facts.defaults, spec.params, schema=schema)
        per_item = [job_params if not item.params else
                    effective_params(spec.kind, facts.defaults, spec.params, item.params,
                                     where=f"items[{i}].params", schema=schema)
                    for i, item in enumerate(spec.items)]
    except SpecError as e:
        raise SpecError(f"{e} (for {what})") from None
    if spec.kind != "text" or not facts.context_length:
        return
    ctx = facts.context_length
    project: dict[str, Any] = getattr(schema, "project_defaults", dict)()
    fallback = int(project.get("max_new_tokens") or 0)  # unset: the project default runs
    counts = _prompt_tokens(spec, facts.tokenizer_file)
    for i, p in enumerate(per_item):
        tokens = getattr(p, "max_new_tokens", None) or fallback
        prompt = counts[i] if counts is not None else 0
        if prompt + tokens > ctx:
            where = f"items[{i}]" if spec.items[i].params or counts is not None else "params"
            said = f"{prompt} prompt tokens plus max_new_tokens {tokens}" if prompt else f"max_new_tokens {tokens}"
            raise SpecError(f"{where}: {said} is over the context of {ctx} tokens of model {facts.tag}")


def _prompt_tokens(spec: JobSpec, tokenizer_file: Path | None) -> list[int] | None:
    """Each item's prompt tokens (0 for a ``from`` item), or None when no local tokenizer.json."""
    if tokenizer_file is None or not tokenizer_file.is_file():
        return None
    st = tokenizer_file.stat()
    tok = _tokenizer(str(tokenizer_file), st.st_mtime_ns, st.st_size)
    if tok is None:
        return None
    texts = [item.input_text if item.messages is None else "\n".join(m.content for m in item.messages)
             for item in spec.items]
    encoded = tok.encode_batch(texts, add_special_tokens=True)
    return [len(e.ids) if item.source is None else 0 for e, item in zip(encoded, spec.items, strict=True)]


@functools.lru_cache(maxsize=8)
def _tokenizer(path: str, mtime_ns: int, size: int) -> Any:
    """A tokenizer.json read once per file version (a streamed submit checks each batch); None when the
    ``tokenizers`` library cannot read it (the worker counts then)."""
    try:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(path)
    except Exception:
        return None
