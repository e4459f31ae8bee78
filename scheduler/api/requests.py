"""A batch input file, line by line: OpenAI's request format checked and mapped onto job items.
Nothing here writes; every problem is collected with its line number."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from aigc_core.spec import ItemSpec

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
ENDPOINTS = (COMPLETIONS, CHAT)
MAX_ERRORS = 100

# Sampling fields both endpoints map onto the text backend's parameters.
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


def chat_supported() -> bool:
    """Chat items (``messages``) exist in this build's job spec."""
    return "messages" in ItemSpec.model_fields


@dataclass
class Parsed:
    model: str | None = None
    seed: int | None = None
    items: list[dict[str, Any]] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)  # the input line of each item (1-based)
    errors: list[dict[str, Any]] = field(default_factory=list)

    def error(self, line: int | None, code: str, message: str, param: str | None = None) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append({"code": code, "message": message, "param": param, "line": line})


def parse_requests(data: bytes, endpoint: str, models: set[str], max_requests: int) -> Parsed:
    p = Parsed()
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
        _request(p, lineno, req, endpoint, models, seen)
    if n == 0:
        p.error(None, "empty_file", "the file holds no requests")
    return p


def _request(p: Parsed, line: int, req: Any, endpoint: str, models: set[str], seen: dict[str, int]) -> None:
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
    if not isinstance(model, str) or model.partition("@")[0] not in models:
        p.error(line, "model_not_found", f"body.model {model!r} is not a registered model", "body.model")
    elif p.model is None:
        p.model = model
    elif model != p.model:
        p.error(line, "mismatched_model", f"body.model {model!r} differs from {p.model!r}: one model per batch",
                "body.model")
    item = _completion(p, line, body) if endpoint == COMPLETIONS else _chat(p, line, body)
    if item is not None and cid is not None:
        p.items.append({"custom_id": cid, **item})
        p.lines.append(line)


def _common(p: Parsed, line: int, body: dict[str, Any], allowed: set[str]) -> dict[str, Any] | None:
    ok = True
    for k in sorted(body):
        if k not in allowed:
            p.error(line, "unsupported_parameter", f"body.{k} is not supported by this server", f"body.{k}")
            ok = False
        elif k in _DEFAULTS and _DEFAULTS[k] and body[k] not in _DEFAULTS[k]:
            p.error(line, "unsupported_value", f"body.{k}={body[k]!r} is not supported (only "
                    f"{_DEFAULTS[k][0]!r})", f"body.{k}")
            ok = False
    params = {ours: body[theirs] for theirs, ours in _SAMPLING.items() if body.get(theirs) is not None}
    tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if tokens is not None:
        params["max_new_tokens"] = tokens
    seed = body.get("seed")
    if seed is not None:
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            p.error(line, "invalid_value", "body.seed must be a non-negative integer", "body.seed")
            ok = False
        elif p.seed is None:
            p.seed = seed
    return params if ok else None


def _completion(p: Parsed, line: int, body: dict[str, Any]) -> dict[str, Any] | None:
    params = _common(p, line, body, _COMPLETION_FIELDS)
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


def _chat(p: Parsed, line: int, body: dict[str, Any]) -> dict[str, Any] | None:
    params = _common(p, line, body, _CHAT_FIELDS)
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
