"""``aigc models``: the model registry (list, show, register)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from aigc_core.errors import NotFound
from scheduler.cli.ops import stdout_console

models_app = typer.Typer(no_args_is_help=True, help="The model registry.")
out = stdout_console()


def _client():
    from scheduler.client import Client

    return Client()


@models_app.command("list")
def models_list() -> None:
    """Registered models and versions."""
    t = Table("model", "kind", "backend", "uri", "digest", "created")
    for m in _client().models():
        t.add_row(m["tag"], m["kind"], m["backend"], m["uri"], (m["digest"] or "")[:19], m["created_at"][:19])
    out.print(t)


@models_app.command("show")
def models_show(name: str) -> None:
    """Every version of NAME with its URI, digest and lineage."""
    rows = [m for m in _client().models() if m["name"] == name]
    if not rows:
        raise NotFound(f"unknown model {name!r}")
    out.print_json(json.dumps(rows, default=str))


@models_app.command("register")
def models_register(name: str, uri: str, kind: str = "text",
                    backend: Annotated[str | None, typer.Option()] = None) -> None:
    """Register a new version of NAME at URI (file://DIR or s3://bucket/prefix)."""
    ref = _client().register_model(name, kind, uri, backend=backend)
    out.print(f"registered {ref.tag}")
