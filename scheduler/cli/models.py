"""``aigc models``: the model registry (list, show, register)."""

from __future__ import annotations

import json
import re
from typing import Annotated

import typer
from rich.table import Table

from aigc_core.errors import NotFound, SpecError
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
def models_register(
    name: str,
    uri: Annotated[str, typer.Argument(help="file:///dir, s3://bucket/prefix/ or builtin://name")],
    kind: Annotated[str, typer.Option(help="text, image or audio")] = "text",
    backend: Annotated[str | None, typer.Option(help="default: hf-causal-lm, diffusers or hf-tts by kind")] = None,
    digest: Annotated[str | None, typer.Option(help="sha256:... of the files, instead of hashing an s3:// "
                                                    "model's objects now; checked when a worker fetches it")] = None,
) -> None:
    """Register a new version of NAME at URI. Refused, with nothing written: a scheme the workers cannot
    fetch, a missing directory or prefix, an architecture the backend does not run, weights that are not
    safetensors."""
    if digest is not None and not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise SpecError(f"--digest {digest!r}: expected sha256: and 64 hex digits")
    ref = _client().register_model(name, kind, uri, backend=backend, digest=digest)
    ctx = ref.defaults.get("context_length")
    out.print(f"registered {ref.tag} ({ref.backend}{', context ' + str(ctx) + ' tokens' if ctx else ''}, "
              f"digest {(ref.digest or 'none')[:19]})")
