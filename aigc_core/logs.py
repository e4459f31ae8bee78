"""Logging for every entry point: text or one JSON object a line, with job_id / chunk / item on lines about them.

A line is about a job when it is logged inside ``log_context(job_id=...)`` (the pipeline wraps each
chunk in one), when the call passes ``extra={"job_id": ...}``, or when it is one of Celery's own
lines about a ``worker.run_chunk`` task (received, succeeded, retry, failed): their ``data`` carries
the task's arguments, which are ids only.
"""

from __future__ import annotations

import ast
import contextvars
import json
import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

CONTEXT_FIELDS = ("job_id", "chunk", "item")
# Celery tasks whose positional arguments name a job: task name -> the fields they fill.
TASK_ARG_FIELDS = {"worker.run_chunk": ("job_id", "chunk")}

# Read-only: log_context sets a new mapping, never changes the one it found.
_context: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "aigc_log_context", default=MappingProxyType({}))
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}
_MARK = "_aigc_instrumented"


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Every line logged inside (in this thread or task) carries these fields unless it sets its own."""
    token = _context.set({**_context.get(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


class ContextFilter(logging.Filter):
    """Puts the job fields on the record: from ``log_context``, or from a Celery task line's arguments."""

    def filter(self, record: logging.LogRecord) -> bool:
        for k, v in _context.get().items():
            if not hasattr(record, k):
                setattr(record, k, v)
        data = getattr(record, "data", None)
        if isinstance(data, dict) and data.get("name") in TASK_ARG_FIELDS and not hasattr(record, "job_id"):
            for k, v in zip(TASK_ARG_FIELDS[data["name"]], _task_args(data.get("args")), strict=False):
                setattr(record, k, v)
        if "celery" in sys.modules and not hasattr(record, "task_id"):
            _add_current_task(record)
        return True


def _task_args(args: Any) -> list[Any]:
    if isinstance(args, str):  # Celery passes argsrepr, e.g. "['3f2a...', 4]"
        try:
            args = ast.literal_eval(args)
        except (ValueError, SyntaxError):
            return []
    return list(args) if isinstance(args, (list, tuple)) else []


def _add_current_task(record: logging.LogRecord) -> None:
    from celery._state import get_current_task

    task = get_current_task()
    if task is None or task.request.id is None:
        return
    record.task_id, record.task_name = task.request.id, task.name
    if task.name in TASK_ARG_FIELDS and not hasattr(record, "job_id"):
        for k, v in zip(TASK_ARG_FIELDS[task.name], task.request.args or (), strict=False):
            setattr(record, k, v)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, logger, message, the job fields, any other extra, exc."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
            "process": record.process,
        }
        for k in CONTEXT_FIELDS:
            if getattr(record, k, None) is not None:
                doc[k] = getattr(record, k)
        for k, v in record.__dict__.items():
            if k not in _STANDARD and k not in doc and not k.startswith("_") and k != "data":
                doc[k] = v
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc"] = record.exc_text
        return json.dumps(doc, ensure_ascii=False, default=str)


class ContextSuffixFormatter(logging.Formatter):
    """Text lines: the handler's own format, then `` job_id=... chunk=... item=...`` when present."""

    def __init__(self, inner: logging.Formatter | None = None, fmt: str | None = None):
        super().__init__(fmt)
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        text = self.inner.format(record) if self.inner is not None else super().format(record)
        ctx = " ".join(f"{k}={getattr(record, k)}" for k in CONTEXT_FIELDS if getattr(record, k, None) is not None)
        if not ctx:
            return text
        first, nl, rest = text.partition("\n")  # after the message, before any traceback
        return f"{first}  {ctx}{nl}{rest}"


TEXT_FORMAT = "[%(asctime)s: %(levelname)s] %(name)s: %(message)s"


def instrument_handler(handler: logging.Handler, json_lines: bool) -> None:
    """Give an existing handler the context filter and our formatter (JSON, or its own plus the fields)."""
    if getattr(handler, _MARK, None) == json_lines:
        return
    if not any(isinstance(f, ContextFilter) for f in handler.filters):
        handler.addFilter(ContextFilter())
    current = handler.formatter
    if isinstance(current, (JsonFormatter, ContextSuffixFormatter)):
        current = getattr(current, "inner", None)
    handler.setFormatter(JsonFormatter() if json_lines else ContextSuffixFormatter(current, TEXT_FORMAT))
    setattr(handler, _MARK, json_lines)


def setup_logging(json_lines: bool = False, level: str | int = "INFO") -> None:
    """The root logger writes to stderr, as JSON lines or text; calling again replaces our handler."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, _MARK, None) is not None:
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    instrument_handler(handler, json_lines)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)


def hook_celery(json_lines: bool) -> None:
    """After Celery sets up its loggers (worker, beat), give their handlers our filter and format."""
    from celery import signals

    def _instrument(logger: logging.Logger | None = None, **_: Any) -> None:
        for h in (logger or logging.getLogger()).handlers:
            instrument_handler(h, json_lines)

    # weak=False: the receivers are closures that must outlive this call.
    signals.after_setup_logger.connect(_instrument, weak=False, dispatch_uid="aigc-logs-root")
    signals.after_setup_task_logger.connect(_instrument, weak=False, dispatch_uid="aigc-logs-task")
