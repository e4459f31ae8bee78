"""``aigc keys`` (the API's bearer keys), ``aigc serve`` (the OpenAI-compatible API on uvicorn) and
``aigc submit --openai-batch`` (the same file format without a server)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from aigc_core.errors import AigcError, SpecError
from scheduler.cli.ops import err, stdout_console

keys_app = typer.Typer(no_args_is_help=True, help="API keys of `aigc serve` (only their sha256 is stored).")
out = stdout_console()


def _db():
    from scheduler.client import Client

    return Client().db


@keys_app.command("create")
def keys_create(name: str) -> None:
    """A new key named NAME, printed once: store it now, it cannot be shown again."""
    from scheduler.api.keys import create_key

    key = create_key(_db(), name)
    err.print(f"key {name!r} created; it is shown once:")
    print(key)


@keys_app.command("list")
def keys_list() -> None:
    """Keys by name, with when each was created and revoked (never the key itself)."""
    from scheduler.api.keys import list_keys

    t = Table("name", "created", "revoked")
    for k in list_keys(_db()):
        t.add_row(k.name, k.created_at.isoformat()[:19], k.revoked_at.isoformat()[:19] if k.revoked_at else "")
    out.print(t)


@keys_app.command("revoke")
def keys_revoke(name: str) -> None:
    """Revoke the key NAME: its requests get 401 from then on (its files and batches stay)."""
    from scheduler.api.keys import revoke_key

    revoke_key(_db(), name)
    out.print(f"revoked {name}")


def serve(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="serve without API keys (everything is "
                                          "visible to every caller)")] = False,
    log_level: str = "info",
) -> None:
    """Serve the OpenAI-compatible Batch API (/v1/files, /v1/batches, /v1/models) with uvicorn."""
    import uvicorn

    from aigc_core.settings import Settings
    from scheduler.api import create_app
    from scheduler.api.keys import list_keys
    from scheduler.client import Client

    client = Client(Settings())
    if not no_auth and not any(k.revoked_at is None for k in list_keys(client.db)):
        raise AigcError("no active API key: create one with `aigc keys create NAME`, or pass --no-auth")
    if no_auth:
        err.print("serving WITHOUT auth (--no-auth): every caller sees every file and batch")
    uvicorn.run(create_app(client.settings, auth=not no_auth, client=client), host=host, port=port,
                log_level=log_level)


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")
    app.command()(serve)


def submit_openai_batch(path: Path | None, output: Path | None, wait: bool, key: str | None, *,
                        combined: bool) -> None:
    """``aigc submit --openai-batch FILE [--wait] [--output OUT]``: the same checks and output file as
    `aigc serve`, without a server (scheduler/openai_batch.py); --output waits for the job."""
    from scheduler.cli.root import _client, _finished
    from scheduler.openai_batch import errors_path

    if path is None:
        raise SpecError("--output goes with --openai-batch FILE")
    if combined:
        raise SpecError("--openai-batch takes the model and parameters from the file: give no job file, "
                        "--items, --kind, --model, --param or --seed with it")
    client = _client()
    job = client.submit_openai_batch(path, idempotency_key=key)
    out.print(job.id)
    if not (wait or output):
        if client.publish is None:
            err.print("no broker configured (AIGC_BROKER_URL): run `aigc wait JOB` or `aigc worker` to execute it")
        return
    view = client.wait(job.id, progress=True)
    if output:
        ok, bad = client.openai_batch_output(view.id, output)
        err.print(f"output: {ok} lines in {output}" + (f"; errors: {bad} lines in {errors_path(output)}"
                                                       if bad else ""), highlight=False)
    _finished(view)
