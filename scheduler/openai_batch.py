"""OpenAI's Batch file format, shared by ``aigc serve`` and the client (``aigc submit --openai-batch``):
request lines checked and mapped onto job items, and output / error lines built from a job's committed
artifacts. Torch-free and FastAPI-free; nothing here writes to the database but through the Client."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aigc_core.errors import SpecError
from aigc_core.jobs import JobView, Result, iter_results
from aigc_core.schema import ItemStatus
from aigc_core.spec import ItemSpec

if TYPE_CHECKING:
    from scheduler.client import Client

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
IMAGES = "/v1/images/generations"
SPEECH = "/v1/audio/speech"
ENDPOINTS = (COMPLETIONS, CHAT, IMAGES, SPEECH)
KIND_OF = {COMPLETIONS: "text", CHAT: "text", IMAGES: "image", SPEECH: "audio"}
MAX_ERRORS = 100
B64 = "b64_json"

# Sampling fields both text endpoints map onto the text backend's parameters.
_SAMPLING = {"temperature": "temperature", "top_p": "top_p", "stop": "stop"}
# Fields accepted only at their default (what this runner does anyway).
_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "n": (1, None), "stream": (False, None), "logprobs": (None, False), "top_logprobs": (None, 0),
    "frequency_penalty": (0, 0.0, None), "presence_penalty": (0, 0.0, None), "logit_bias": (None, {}),
    "best_of": (1, None), "suffix": (None,), "stream_options": (None,), "user": (), "store": (),
    "metadata": (), "parallel_tool_calls": (),
}
_COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "seed", "echo", *_SAMPLING, *_DEFAULTS}
_CHAT_FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "seed", *_SAMPLING, *_DEFAULTS}
_IMAGE_DEFAULTS: dict[str, tuple[Any, ...]] = {"n": (1, None), "user": (), "output_format": ("png", None)}
_IMAGE_FIELDS = {"model", "prompt", "size", "seed", "response_format", *_IMAGE_DEFAULTS}
_SPEECH_DEFAULTS: dict[str, tuple[Any, ...]] = {"user": ()}
_SPEECH_FIELDS = {"model", "input", "voice", "seed", "response_format", *_SPEECH_DEFAULTS}
# response_format: the stored object named by its URI (the first), or its bytes in base64.
_FORMATS = {IMAGES: ("url", B64), SPEECH: ("wav", B64)}
_SIZE = re.compile(r"^(\d{1,4})x(\d{1,4})$")
_ITEM_REF = re.compile(r"^items\[(\d+)\]")


def chat_supported() -> bool:
    """Chat items (``messages``) exist in this build's job spec."""
    return "messages" in ItemSpec.model_fields


@dataclass
class Parsed:
    model: str | None = None
    seed: int | None = None
    response_format: str | None = None  # images / speech: one for the whole batch
    items: list[dict[str, Any]] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)  # the input line of each item (1-based)
    errors: list[dict[str, Any]] = field(default_factory=list)

    def error(self, line: int | None, code: str, message: str, param: str | None = None) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append({"code": code, "message": message, "param": param, "line": line})


def parse_requests(data: bytes, endpoint: str, models: Mapping[str, str] | Collection[str],
                   max_requests: int) -> Parsed:
    """Every line checked (all problems collected with their line numbers) and mapped onto an item.
    ``models``: the registered names of the endpoint's kind, or {name: backend}."""
    p = Parsed()
    backends = dict(models) if isinstance(models, Mapping) else dict.fromkeys(models, "")
    seen: dict[str, int] = {}
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        p.error(None, "invalid_file", "the file is not UTF-8 text")
        return p
    n = 0
    for lineno, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        n += 1
        if n > max_requests:
            p.error(lineno, "too_many_requests", f"more than {max_requests} requests in one batch")
            break
        try:
            req = json.loads(raw)
        except json.JSONDecodeError as e:
            p.error(lineno, "invalid_json_line", f"not valid JSON: {e.msg}")
            continue
        _request(p, lineno, req, endpoint, backends, seen)
    if n == 0:
        p.error(None, "empty_file", "the file holds no requests")
    return p


def _request(p: Parsed, line: int, req: Any, endpoint: str, backends: dict[str, str], seen: dict[str, int]) -> None:
    if not isinstance(req, dict):
        p.error(line, "invalid_request", "a line must be a JSON object")
        return
    extra = sorted(set(req) - {"custom_id", "method", "url", "body"})
    if extra:
        p.error(line, "invalid_request", f"unknown field {extra[0]!r}", extra[0])
    cid = req.get("custom_id")
    if not isinstance(cid, str) or not cid or not cid.isprintable():
        p.error(line, "missing_custom_id", "custom_id must be a non-empty string", "custom_id")
        cid = None
    elif cid in seen:
        p.error(line, "duplicate_custom_id", f"custom_id {cid!r} is also on line {seen[cid]}", "custom_id")
    else:
        seen[cid] = line
    if req.get("method") != "POST":
        p.error(line, "invalid_method", "method must be 'POST'", "method")
    if req.get("url") != endpoint:
        p.error(line, "mismatched_url", f"url {req.get('url')!r} is not the batch's endpoint {endpoint!r}", "url")
    body = req.get("body")
    if not isinstance(body, dict):
        p.error(line, "invalid_body", "body must be a JSON object", "body")
        return
    model = body.get("model")
    if not isinstance(model, str) or model.partition("@")[0] not in backends:
        p.error(line, "model_not_found", f"body.model {model!r} is not a registered "
                f"{KIND_OF.get(endpoint, 'text')} model", "body.model")
    elif p.model is None:
        p.model = model
    elif model != p.model:
        p.error(line, "mismatched_model", f"body.model {model!r} differs from {p.model!r}: one model per batch",
                "body.model")
    backend = backends.get(str(model).partition("@")[0], "")
    parse = {COMPLETIONS: _completion, CHAT: _chat, IMAGES: _image, SPEECH: _speech}.get(endpoint, _completion)
    item = parse(p, line, body, backend)
    if item is not None and cid is not None:
        p.items.append({"custom_id": cid, **item})
        p.lines.append(line)


def _fields(p: Parsed, line: int, body: dict[str, Any], allowed: set[str],
            defaults: dict[str, tuple[Any, ...]]) -> bool:
    ok = True
    for k in sorted(body):
        if k not in allowed:
            p.error(line, "unsupported_parameter", f"body.{k} is not supported by this server", f"body.{k}")
            ok = False
        elif k in defaults and defaults[k] and body[k] not in defaults[k]:
            p.error(line, "unsupported_value", f"body.{k}={body[k]!r} is not supported (only "
                    f"{defaults[k][0]!r})", f"body.{k}")
            ok = False
    seed = body.get("seed")
    if seed is not None:
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            p.error(line, "invalid_value", "body.seed must be a non-negative integer", "body.seed")
            ok = False
        elif p.seed is None:
            p.seed = seed
    return ok


def _text_params(p: Parsed, line: int, body: dict[str, Any], allowed: set[str]) -> dict[str, Any] | None:
    ok = _fields(p, line, body, allowed, _DEFAULTS)
    params = {ours: body[theirs] for theirs, ours in _SAMPLING.items() if body.get(theirs) is not None}
    tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if tokens is not None:
        params["max_new_tokens"] = tokens
    return params if ok else None


def _completion(p: Parsed, line: int, body: dict[str, Any], backend: str) -> dict[str, Any] | None:
    params = _text_params(p, line, body, _COMPLETION_FIELDS)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        p.error(line, "invalid_value", "body.prompt must be a string (one prompt per request)", "body.prompt")
        return None
    if params is None:
        return None
    if body.get("echo"):
        params["echo"] = True
    return {"prompt": prompt, "params": params}


def _chat(p: Parsed, line: int, body: dict[str, Any], backend: str) -> dict[str, Any] | None:
    params = _text_params(p, line, body, _CHAT_FIELDS)
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        p.error(line, "invalid_value", "body.messages must be a non-empty list", "body.messages")
        return None
    out = []
    for k, m in enumerate(msgs):
        where = f"body.messages[{k}]"
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            p.error(line, "invalid_value", f"{where}: role must be system, developer, user or assistant", where)
            return None
        content = m.get("content")
        if isinstance(content, list):  # text parts only
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                       for c in content):
                p.error(line, "unsupported_value", f"{where}.content: only text parts are supported", where)
                return None
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            p.error(line, "invalid_value", f"{where}.content must be text", f"{where}.content")
            return None
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    if params is None:
        return None
    return {"messages": out, "params": params}


def _response_format(p: Parsed, line: int, body: dict[str, Any], endpoint: str) -> bool:
    """One response_format for the whole batch: the job records it once, and the output follows it."""
    fmt = body.get("response_format") or _FORMATS[endpoint][0]
    if fmt not in _FORMATS[endpoint]:
        p.error(line, "unsupported_value", f"body.response_format={fmt!r} is not supported (use "
                f"{' or '.join(map(repr, _FORMATS[endpoint]))})", "body.response_format")
        return False
    if p.response_format is None:
        p.response_format = fmt
    elif fmt != p.response_format:
        p.error(line, "mismatched_response_format", f"body.response_format {fmt!r} differs from "
                f"{p.response_format!r}: one response_format per batch", "body.response_format")
        return False
    return True


def _image(p: Parsed, line: int, body: dict[str, Any], backend: str) -> dict[str, Any] | None:
    ok = _fields(p, line, body, _IMAGE_FIELDS, _IMAGE_DEFAULTS) & _response_format(p, line, body, IMAGES)
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        p.error(line, "invalid_value", "body.prompt must be a string", "body.prompt")
        return None
    params: dict[str, Any] = {}
    size = body.get("size")
    if size is not None and size != "auto":
        m = _SIZE.match(size) if isinstance(size, str) else None
        if m is None:
            p.error(line, "invalid_value", "body.size must be 'WIDTHxHEIGHT' (e.g. '512x512') or 'auto'",
                    "body.size")
            return None
        width, height = int(m.group(1)), int(m.group(2))
        if backend == "digits":  # the digits models draw square images of one side
            if width != height:
                p.error(line, "unsupported_value", "body.size: this model draws square images only",
                        "body.size")
                return None
            params["size"] = width
        else:
            params.update(width=width, height=height)
    return {"prompt": prompt, "params": params} if ok else None


def _speech(p: Parsed, line: int, body: dict[str, Any], backend: str) -> dict[str, Any] | None:
    ok = _fields(p, line, body, _SPEECH_FIELDS, _SPEECH_DEFAULTS) & _response_format(p, line, body, SPEECH)
    text = body.get("input")
    if not isinstance(text, str) or not text.strip():
        p.error(line, "invalid_value", "body.input must be non-empty text", "body.input")
        return None
    params: dict[str, Any] = {}
    voice = body.get("voice")
    if voice is not None:
        if not isinstance(voice, (str, int)) or isinstance(voice, bool):
            p.error(line, "invalid_value", "body.voice must be a string", "body.voice")
            return None
        if backend == "espeak":
            params["voice"] = str(voice)
        elif str(voice).isdigit():  # hf-tts: a multi-speaker model's speaker number
            params["speaker_id"] = int(voice)
        else:
            p.error(line, "unsupported_value", f"body.voice {voice!r}: this model takes a speaker number "
                    "('0', '1', ...)", "body.voice")
            return None
    return {"text": text, "params": params} if ok else None


# ---- submit -------------------------------------------------------------------------------------

def model_backends(client: Client, endpoint: str) -> dict[str, str]:
    """{name: backend} of the registered models that serve ``endpoint`` (the newest version's backend)."""
    out: dict[str, tuple[int, str]] = {}
    for m in client.models():
        if m["kind"] == KIND_OF[endpoint] and (m["name"] not in out or m["version"] > out[m["name"]][0]):
            out[m["name"]] = (m["version"], m["backend"] or "")
    return {k: v[1] for k, v in out.items()}


def max_requests(client: Client) -> int:
    return min(client.settings.api_max_batch_requests, client.settings.limits.max_items_per_job)


def submit_requests(client: Client, data: bytes, endpoint: str, *, idempotency_key: str | None = None,
                    metadata: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], JobView | None]:
    """The errors (with line numbers) that refuse the file, or the job it became. Nothing is written
    for a refused file."""
    if endpoint not in ENDPOINTS:
        return [{"code": "invalid_value", "message": f"endpoint {endpoint!r} is not supported; use one of "
                 f"{', '.join(ENDPOINTS)}", "param": "endpoint", "line": None}], None
    parsed = parse_requests(data, endpoint, model_backends(client, endpoint), max_requests(client))
    if parsed.errors:
        return parsed.errors, None
    assert parsed.model is not None
    meta = {"endpoint": endpoint, **({"response_format": parsed.response_format} if parsed.response_format
                                     else {}), **(metadata or {})}
    try:
        view = client.submit(KIND_OF[endpoint], parsed.model, parsed.items, seed=parsed.seed,
                             idempotency_key=idempotency_key, metadata=meta)
    except SpecError as e:
        m = _ITEM_REF.match(str(e))
        line = parsed.lines[int(m.group(1))] if m and int(m.group(1)) < len(parsed.lines) else None
        return [{"code": "invalid_request", "message": str(e), "param": None, "line": line}], None
    return [], view


def describe_errors(errors: list[dict[str, Any]], name: str = "input") -> str:
    """The refusal as one line of text (the CLI's error): the first problem, with its line number."""
    first = errors[0]
    where = f"{name} line {first['line']}" if first.get("line") else name
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first['message']} [{first['code']}]{more}"


# ---- output -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OutputNames:
    """How the lines of one batch are named: ``batch_req_<stem>_<index>`` and ``req_<job>_<index>``."""

    stem: str
    job_id: str

    def line_id(self, r: Result) -> str:
        return f"batch_req_{self.stem}_{r.index}"

    def request_id(self, r: Result) -> str:
        return f"req_{self.job_id}_{r.index}"


def succeeded(r: Result) -> bool:
    return r.status == ItemStatus.succeeded and r.key is not None


def output_lines(client: Client, view: JobView, endpoint: str, names: OutputNames, created: int) -> Iterator[bytes]:
    """One line per succeeded request, in item order, from the committed artifacts."""
    body = _BODIES.get(endpoint, _completion_body)
    fmt = (view.metadata or {}).get("response_format")
    for r in iter_results(client.db, view.id):
        if succeeded(r):
            line = {"id": names.line_id(r), "custom_id": r.custom_id,
                    "response": {"status_code": 200, "request_id": names.request_id(r),
                                 "body": body(client, r, view, created, fmt)},
                    "error": None}
            yield (json.dumps(line, ensure_ascii=False) + "\n").encode()


def error_lines(client: Client, view: JobView, names: OutputNames) -> Iterator[bytes]:
    """One line per failed or cancelled request."""
    for r in iter_results(client.db, view.id, with_provenance=False):
        if succeeded(r):
            continue
        code = "batch_cancelled" if r.status == ItemStatus.cancelled else "generation_failed"
        message = r.error or ("cancelled before it ran" if r.status == ItemStatus.cancelled else r.status.value)
        line = {"id": names.line_id(r), "custom_id": r.custom_id, "response": None,
                "error": {"code": code, "message": message}}
        yield (json.dumps(line, ensure_ascii=False) + "\n").encode()


def _usage(r: Result) -> tuple[dict[str, int], str]:
    out = r.provenance.get("output") or {}
    prompt, new = int(out.get("prompt_tokens", 0)), int(out.get("new_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": new, "total_tokens": prompt + new}, \
        str(out.get("finish_reason") or "stop")


def _text(client: Client, r: Result) -> str:
    return client.store.get(r.key or "").decode("utf-8", errors="replace")


def _model(view: JobView) -> str:
    return view.model.partition("@")[0]


def _completion_body(client: Client, r: Result, view: JobView, created: int, fmt: str | None) -> dict[str, Any]:
    usage, finish = _usage(r)
    return {"id": f"cmpl-{view.id}-{r.index}", "object": "text_completion", "created": created,
            "model": _model(view),
            "choices": [{"index": 0, "text": _text(client, r), "finish_reason": finish, "logprobs": None}],
            "usage": usage}


def _chat_body(client: Client, r: Result, view: JobView, created: int, fmt: str | None) -> dict[str, Any]:
    usage, finish = _usage(r)
    return {"id": f"chatcmpl-{view.id}-{r.index}", "object": "chat.completion", "created": created,
            "model": _model(view),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": _text(client, r), "refusal": None},
                         "finish_reason": finish, "logprobs": None}], "usage": usage}


def _stored(client: Client, r: Result, fmt: str | None) -> dict[str, Any]:
    """The stored object by name (URI, sha256, media type, size), or its bytes in base64."""
    named: dict[str, Any] = {"sha256": r.sha256, "media_type": r.media_type, "bytes": r.size}
    if fmt == B64:
        return {"b64_json": base64.b64encode(client.store.get(r.key or "")).decode("ascii"), **named}
    return {"url": r.uri, **named}


def _image_body(client: Client, r: Result, view: JobView, created: int, fmt: str | None) -> dict[str, Any]:
    return {"created": created, "model": _model(view), "data": [{**_stored(client, r, fmt), "revised_prompt": None}]}


def _speech_body(client: Client, r: Result, view: JobView, created: int, fmt: str | None) -> dict[str, Any]:
    return {"object": "audio.speech", "created": created, "model": _model(view), **_stored(client, r, fmt),
            "duration_s": r.duration_s}


_BODIES: dict[str, Callable[[Client, Result, JobView, int, str | None], dict[str, Any]]] = {
    COMPLETIONS: _completion_body, CHAT: _chat_body, IMAGES: _image_body, SPEECH: _speech_body}


# ---- without a server: files on disk ------------------------------------------------------------

def read_input(source: str | Path | bytes | Iterable[Mapping[str, Any] | str], max_bytes: int) -> bytes:
    """A batch input file's bytes: from a path (refused by size before it is read), the bytes
    themselves, or its lines (dicts, or JSON text)."""
    if isinstance(source, bytes):
        data = source
    elif isinstance(source, (str, Path)):
        path = Path(source)
        try:
            size = path.stat().st_size
            if size > max_bytes:
                raise SpecError(f"{path}: {size} bytes is over the limit of {max_bytes} "
                                "(AIGC_LIMIT_MAX_ITEMS_FILE_BYTES)")
            data = path.read_bytes()
        except OSError as e:
            raise SpecError(f"{path}: {e.strerror or e}") from None
    else:
        data = "".join((x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)).rstrip("\n") + "\n"
                       for x in source).encode()
    if len(data) > max_bytes:
        raise SpecError(f"input: {len(data)} bytes is over the limit of {max_bytes} (AIGC_LIMIT_MAX_ITEMS_FILE_BYTES)")
    return data


def first_url(data: bytes) -> str:
    """The ``url`` of the first request: the endpoint of a file submitted without one."""
    for raw in data.splitlines():
        if raw.strip():
            try:
                url = json.loads(raw).get("url")
            except (ValueError, AttributeError):
                break
            if isinstance(url, str):
                return url
            break
    raise SpecError("input line 1: no url to take the endpoint from (give the endpoint, or a valid first line)")


def write_files(client: Client, view: JobView, dest: Path, errors_dest: Path) -> tuple[int, int]:
    """The job's output file at ``dest`` and its error file at ``errors_dest`` (only when a request
    failed or was cancelled), as ``aigc serve`` writes them; (lines written to each)."""
    meta = view.metadata or {}
    endpoint = meta.get("endpoint")
    if endpoint not in ENDPOINTS:
        raise SpecError(f"job {view.id} was not submitted from an OpenAI batch file")
    if not view.final:
        raise SpecError(f"job {view.id} is {view.status.value}, not final yet: wait for it first")
    batch = meta.get("openai_batch")  # a batch of `aigc serve`: the same line ids as its own files
    names = OutputNames(str(batch).removeprefix("batch_") if batch else view.id, view.id)
    created = int(view.finished_at.timestamp()) if view.finished_at else 0
    counts = []
    for path, lines in ((dest, output_lines(client, view, endpoint, names, created)),
                        (errors_dest, error_lines(client, view, names))):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        n = 0
        with tmp.open("wb") as f:
            for line in lines:
                f.write(line)
                n += 1
        if n or path == dest:
            tmp.replace(path)
        else:
            tmp.unlink()
        counts.append(n)
    return counts[0], counts[1]


def errors_path(dest: Path) -> Path:
    """``results.jsonl`` -> ``results.errors.jsonl``."""
    return dest.with_name(dest.name.removesuffix(".jsonl") + ".errors.jsonl")
