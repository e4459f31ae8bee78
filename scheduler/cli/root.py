"""The ``aigc`` command line. Commands that run a worker import it inside the command, so the rest start fast."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

from aigc_core.errors import AigcError, NotFound, SpecError, service_error
from aigc_core.settings import Limits, Settings
from aigc_core.spec import items_file_location, iter_items_jsonl, load_yaml, parse_scalar, read_items_file
from scheduler.cli import models as cli_models
from scheduler.cli import ops as cli_ops
from scheduler.cli import schedules as cli_schedules
from scheduler.cli.ops import stdout_console

# Exit codes, the same for every command (README, "From the shell").
EXIT_OK = 0
EXIT_ERROR = 1  # not found, a service unreachable, anything else that went wrong
EXIT_BAD_INPUT = 2  # bad input: a file, an option, a value (typer's usage errors use 2 as well)
EXIT_JOB_NOT_SUCCEEDED = 3  # the job ended failed, partially_failed or cancelled
EXIT_TIMEOUT = 4  # `wait --timeout`: the job is still running


class _Commands(TyperGroup):
    """The root group: a reader that went away (``aigc results JOB --json | head``) ends the command
    quietly with 0, as other Unix tools do, instead of click's exit 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            _stdout_gone()


app = typer.Typer(cls=_Commands, add_completion=False, no_args_is_help=True,
                  help="aigc-runner: batch content generation jobs.")
db_app = typer.Typer(no_args_is_help=True, help="Database schema.")
app.add_typer(db_app, name="db")
app.add_typer(cli_models.models_app, name="models")
out = stdout_console()
err = Console(stderr=True, soft_wrap=True)  # one error, one line, whatever the width


def _version(value: bool) -> None:
    if value:
        from aigc_core import __version__

        print(f"aigc-runner {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print aigc-runner's version and exit.")] = False) -> None:
    """aigc-runner: batch content generation jobs."""


def _setup_logging() -> None:
    """Warnings only for short commands unless AIGC_LOG_LEVEL says more; services raise it to INFO themselves."""
    from aigc_core.logs import setup_logging

    try:
        settings = Settings()
    except ValueError:  # a bad AIGC_* value: the command that reads it reports it
        return
    setup_logging(settings.log_json, settings.log_level or "WARNING")


def main() -> None:
    """The ``aigc`` entry point: every error a user can cause or meet is one line on stderr and an exit code."""
    _setup_logging()
    try:
        try:
            app()
        finally:
            sys.stdout.flush()  # here, not at exit, so a closed pipe is handled below
    except BrokenPipeError:
        _stdout_gone()
    except SpecError as e:
        _error("error:", e)
        sys.exit(EXIT_BAD_INPUT)
    except NotFound as e:
        _error("not found:", e)
        sys.exit(EXIT_ERROR)
    except Exception as e:
        failure = describe_failure(e) or (e if isinstance(e, AigcError) else None)
        if failure is None:
            raise  # a bug: typer shows the traceback
        if _debug():
            traceback.print_exception(e, file=sys.stderr)
        _error("error:", failure)
        sys.exit(EXIT_ERROR)


def console_main() -> None:
    """The ``aigc`` console script: ``main``, then the process ends at once if it ran a model.
    (``main`` alone is what tests call in-process.)"""
    try:
        main()
    except SystemExit as e:
        _exit_now_if_torch(e.code)
        raise


def _exit_now_if_torch(code: object) -> None:
    """A command that ran a model here (``submit --wait``, ``wait``, ``demo`` with no broker) is done
    when it returns: everything is committed and printed. Tearing torch down at interpreter exit takes
    about a second for nothing, so the process ends here, after closing the databases and flushing."""
    if "torch" not in sys.modules:
        return
    import logging

    from aigc_core.db import close_all

    with contextlib.suppress(Exception):
        close_all()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code if isinstance(code, int) else (0 if code is None else 1))


def describe_failure(e: BaseException, settings: Settings | None = None) -> AigcError | None:
    """An unreachable database or broker, or a port in use, as one worded error of ours (else None)."""
    if settings is None:
        try:
            settings = Settings()
        except ValueError:
            settings = None
    return service_error(e, database_url=settings.database_url if settings else None,
                         broker_url=settings.broker_url if settings else None)


def _debug() -> bool:
    return os.environ.get("AIGC_LOG_LEVEL", "").upper() == "DEBUG"


def _stdout_gone() -> None:
    """The reader of stdout went away: exit 0, with stdout pointed at devnull so that the interpreter's
    last flush does not fail again (https://docs.python.org/3/library/signal.html#note-on-sigpipe)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(EXIT_OK)


def _error(label: str, e: Exception) -> None:
    """One line on stderr: the message is text, never markup (a custom_id may read "[/b]"), and any
    control character in it (a newline in a key of the user's file) is shown escaped."""
    msg = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(e))
    err.print(Text.assemble((label, "red"), " ", msg), highlight=False)


def _client():
    from scheduler.client import Client

    return Client()


# ---- input files ------------------------------------------------------------------------------

def load_job_file(path: Path, limits: Limits | None = None) -> dict[str, Any]:
    """A job.yaml (or .json): kind, model, params, seed, metadata, and items or items_file (a path next
    to the job file, or s3:// in an allowed bucket: the rule schedules follow, aigc_core.spec)."""
    data = load_yaml(path, limits)
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping with kind, model and items")
    if "items_file" in data:
        settings = Settings()
        if limits is not None:
            settings = settings.model_copy(update={"limits": limits})
        try:
            location = items_file_location(data.pop("items_file"), settings=settings, base_dir=path.parent)
        except SpecError as e:
            raise SpecError(f"{path}: {e}") from None
        data["items"] = read_items_file(location, settings=settings)
    return data


def _parse_params(pairs: list[str]) -> dict[str, Any]:
    """``-p NAME=VALUE``: the value read as a YAML scalar (5e-4 a float, 20 an int, true a bool),
    anything else as the text written."""
    params = {}
    for p in pairs:
        k, sep, v = p.partition("=")
        if not sep or not k:
            raise SpecError(f"--param {p!r}: use NAME=VALUE")
        params[k] = parse_scalar(v)
    return params


# ---- jobs -------------------------------------------------------------------------------------

@app.command()
def submit(
    job_file: Annotated[Path | None, typer.Argument(help="job.yaml with kind, model, items or items_file")] = None,
    items: Annotated[Path | None, typer.Option("--items", help="items.jsonl, one {custom_id, prompt} a line")] = None,
    kind: Annotated[str | None, typer.Option(help="text, image or audio (default: what the model makes)")] = None,
    model: Annotated[str | None, typer.Option(help="model name or name@version")] = None,
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="NAME=VALUE, repeatable")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    key: Annotated[str | None, typer.Option("--idempotency-key", help="same key + payload = same job")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="wait for the job and show progress")] = False,
    reuse: Annotated[bool, typer.Option("--reuse", help="items identical to an earlier succeeded one (weights "
                                        "digest, parameters, prompt, seed) reuse its output")] = False,
    openai_batch: Annotated[Path | None, typer.Option("--openai-batch", help="an OpenAI Batch input file "
                                                      "(requests.jsonl), as `aigc serve` takes it")] = None,
    output: Annotated[Path | None, typer.Option("--output", help="with --openai-batch: wait, then write the "
                                                "OpenAI output file here (errors: NAME.errors.jsonl)")] = None,
) -> None:
    """Submit a job; prints its id."""
    if openai_batch or output:
        from scheduler.cli.keys import submit_openai_batch

        others = (job_file, items, kind, model, param, seed)
        submit_openai_batch(openai_batch, output, wait, key, combined=any(x is not None for x in others))
        return
    data: dict[str, Any] = load_job_file(job_file) if job_file else {}
    if items:  # read as the job is written, a batch at a time (scheduler/bulk.py)
        data["items"] = iter_items_jsonl(items, Settings().limits)
    for name, value in (("kind", kind), ("model", model), ("seed", seed), ("idempotency_key", key)):
        if value is not None:
            data[name] = value
    if reuse:
        data["reuse"] = True
    if param:
        if not isinstance(data.get("params", {}), dict):
            raise SpecError(f"{job_file}: params must be a mapping of NAME: VALUE")
        data["params"] = {**data.get("params", {}), **_parse_params(param)}
    if "items" not in data:
        raise SpecError("no items: give a job file with items/items_file, or --items FILE.jsonl")
    client = _client()
    if "kind" not in data:
        data["kind"] = _kind_of(client, data.get("model"))
    if wait:  # embedded: torch and the backend import while the job is written
        client.runner.warm(client, data["model"] if isinstance(data.get("model"), str) else None)
    job = client.submit(data)
    out.print(job.id)
    if wait:
        _finished(client.wait(job.id, progress=True))
    elif client.publish is None:
        err.print("no broker configured (AIGC_BROKER_URL): run `aigc wait JOB` or `aigc worker` to execute it")


def _kind_of(client, model: Any) -> str:
    """A job's kind when none is given: what its model makes (text when the registry does not know it
    yet, e.g. a model an ``after`` fine-tune will register)."""
    if not isinstance(model, str) or not model:
        return "text"
    try:
        return client.model(model).kind
    except SpecError:
        return "text"


@app.command()
def status(job: Annotated[str | None, typer.Argument()] = None,
           as_json: Annotated[bool, typer.Option("--json")] = False, limit: int = 20) -> None:
    """One job's state and its last events; with no job, the overview: queues, workers, jobs in flight,
    the last failures and the latest jobs."""
    client = _client()
    if not job and not as_json:
        cli_ops.status_overview(client, limit, console=out)
        return
    views = [client.status(job)] if job else client.jobs(limit)
    if as_json:
        out.print_json(json.dumps([_view_dict(v) for v in views] if not job else _view_dict(views[0])))
        return
    if job:
        _show_job(views[0])
        for e in client.events(views[0].id)[-5:]:
            out.print(f"  {e['at'][:19]}  {e['type']}  " + ", ".join(f"{k}={v}" for k, v in e.items()
                                                                   if k not in ("at", "type")))
        return


@app.command()
def finetune(
    base: Annotated[str, typer.Option(help="base model name or name@version")],
    dataset: Annotated[str, typer.Option(help="text: JSONL {\"text\"} or plain text; image: a folder of images "
                                              "with metadata.jsonl; a path, file:// or s3://")],
    output: Annotated[str, typer.Option(help="name the fine-tuned model is registered under")],
    param: Annotated[list[str] | None,
                     typer.Option("--param", "-p", help="hyperparameter NAME=VALUE, repeatable")] = None,
    key: Annotated[str | None, typer.Option("--idempotency-key")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="wait and show step / loss")] = False,
) -> None:
    """Fine-tune a text model or a diffusers image pipeline (the base's kind picks the trainer); on
    success OUTPUT gets a new registered version with its lineage."""
    client = _client()
    job = client.finetune(base, dataset, output, _parse_params(param or []), idempotency_key=key)
    out.print(job.id)
    if wait:
        _finished(client.wait(job.id, progress=True))


@app.command()
def wait(job: str, timeout: Annotated[float | None, typer.Option(help="give up after this many seconds "
                                                                          "(exit 4)")] = None) -> None:
    """Wait for a job with a progress bar (runs it here when no broker is configured); exit 0 only if it
    succeeded, 3 if it ended otherwise."""
    try:
        view = _client().wait(job, progress=True, timeout=timeout)
    except TimeoutError as e:  # Client.wait's: the job is still running
        _error("timeout:", e)
        raise typer.Exit(EXIT_TIMEOUT) from None
    _finished(view)


def _finished(view) -> None:
    """Show a job that ended; exit 3 unless it succeeded (`wait`, `submit --wait`, `finetune --wait`)."""
    _show_job(view)
    if view.status.value != "succeeded":
        raise typer.Exit(EXIT_JOB_NOT_SUCCEEDED)


@app.command()
def results(job: str, download: Annotated[Path | None, typer.Option(help="copy outputs here")] = None,
            as_json: Annotated[bool, typer.Option("--json", help="one JSON object a line")] = False) -> None:
    """List a job's outputs in item order, or download them with the manifest."""
    client = _client()
    if download:
        path = client.download(job, download)
        out.print(f"downloaded to {path}")
        return
    for r in client.results(job):
        if as_json:
            print(json.dumps(r.manifest_line(), ensure_ascii=False))
        else:
            out.print(f"{r.index:6d}  {r.custom_id:20}  {r.status.value:10}  {r.uri or r.error}", highlight=False)


@app.command()
def cancel(job: str) -> None:
    """Cancel a job: no new item starts; finished outputs stay."""
    _show_job(_client().cancel(job))


@app.command()
def retry(job: str) -> None:
    """Run a job's failed items again."""
    out.print(f"{_client().retry_failed(job)} items queued again")


@app.command()
def reconcile(loop: Annotated[float | None, typer.Option(help="repeat every N seconds")] = None) -> None:
    """Re-publish lost chunks, wake expired leases, finalize finished jobs."""
    client = _client()
    while True:
        rep = client.reconcile()
        out.print(f"published {rep.published}, expired leases {rep.expired_leases}, "
                  f"stale chunks {rep.stale_chunks}, finalized {len(rep.finalized)}")
        if loop is None:
            return
        time.sleep(loop)


@app.command()
def gc(
    older_than: Annotated[str, typer.Option("--older-than", help="remove jobs that finished longer ago than this: "
                                                                 "30d, 12h, 90m, 2w")],
    objects: Annotated[bool, typer.Option("--objects", help="also their stored objects: outputs, sidecars, "
                                                            "manifest, errors, orphans under their prefix")] = False,
    orphans: Annotated[bool, typer.Option("--orphans", help="also objects under jobs/ID/ for IDs this database "
                                                            "has no job for, nothing newer than --older-than "
                                                            "(not for a bucket prefix shared with another "
                                                            "database); implies --objects")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print what would go; change nothing")] = False,
) -> None:
    """Remove finished jobs older than --older-than with their rows (and objects with --objects). Never
    an open job, a job a model's lineage names, or one an unfinished job depends on (README, Retention)."""
    from aigc_core.retention import collect_garbage, parse_age

    age = parse_age(older_than)
    client = _client()
    rep = collect_garbage(client.db, client.store if objects or orphans else None, age, objects=objects,
                          orphans=orphans, dry_run=dry_run, progress=lambda line: err.print(line, highlight=False))
    out.print(rep.line(), highlight=False)


# ---- worker and set-up ------------------------------------------------------------------------

@app.command()
def worker(
    queues: Annotated[str, typer.Option(help="comma-separated queues")] = "text,image,audio,train",
    pool: Annotated[str, typer.Option(help="solo (one process per GPU), prefork or threads")] = "solo",
    concurrency: int = 1,
    loglevel: str = "INFO",
    hostname: Annotated[str | None, typer.Option(
        help="Celery node name; default aigc-<pid>@<host>, unique for each worker process on a host "
             "(one per GPU), so Flower and `celery inspect` tell them apart")] = None,
) -> None:
    """Run a worker: Celery when AIGC_BROKER_URL is set, else the embedded one polling the database."""
    settings = Settings()
    if settings.broker_url:
        from worker.app import app as celery_app

        celery_app.worker_main(["worker", "-Q", queues, "--pool", pool, "--concurrency", str(concurrency),
                                "--loglevel", loglevel, "-E", "--without-gossip", "--without-mingle",
                                "--hostname", hostname or f"aigc-{os.getpid()}@%h"])
        return
    from aigc_core.logs import setup_logging
    from worker.inprocess import serve
    from worker.metrics import start_server
    from worker.runtime import get_runtime

    setup_logging(settings.log_json, settings.log_level or loglevel)
    start_server(settings.worker_metrics_port)
    _ = _client().db  # migrates the embedded SQLite database and syncs models.yaml
    err.print("no AIGC_BROKER_URL: embedded worker polling the database (Ctrl-C to stop)")
    serve(get_runtime(settings))


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the database schema to the newest revision."""
    from aigc_core.db import Database

    settings = Settings()
    Database(settings.database_url).upgrade()
    out.print("database is at the newest revision")


@app.command()
def demo(
    items: Annotated[int, typer.Option(help="articles to generate")] = 200,
    max_new_tokens: int = 120,
) -> None:
    """Train the tiny demo news model (once, cached), write articles, draw digits, read articles aloud:
    all in this process, no servers."""
    from worker.demo import run_demo

    run_demo(Settings(), n_items=items, max_new_tokens=max_new_tokens, console=out)


# ---- output helpers ---------------------------------------------------------------------------

def _view_dict(v) -> dict[str, Any]:
    return {"id": v.id, "kind": v.kind, "model": v.model, "status": v.status.value, "counts": v.counts,
            "items": v.item_count, "created_at": v.created_at.isoformat(),
            "finished_at": v.finished_at.isoformat() if v.finished_at else None, "manifest": v.manifest_uri}


def _show_job(v) -> None:
    c = v.counts
    reused = f" ({c['reused']} reused)" if c.get("reused") else ""
    out.print(f"job {v.id}  {v.kind}  {v.model}  [bold]{v.status.value}[/bold]  "
              f"{v.done}/{v.item_count} done: {c['succeeded']} ok{reused}, {c['failed']} failed, "
              f"{c['cancelled']} cancelled", highlight=False)
    if v.progress:
        out.print("training: " + ", ".join(f"{k}={v.progress[k]}" for k in ("step", "loss", "eval_loss")
                                           if k in v.progress), highlight=False)
    if v.manifest_uri:
        out.print(f"manifest: {v.manifest_uri}", highlight=False)


app.command()(cli_schedules.scheduler)
app.add_typer(cli_schedules.schedules_app, name="schedules")
app.command()(cli_ops.metrics)
app.command()(cli_ops.flower)
from scheduler.cli import keys as cli_keys  # noqa: E402  (aigc keys, aigc serve: issue 13)

cli_keys.register(app)
from scheduler.cli import credentials as cli_credentials  # noqa: E402  (aigc credentials, aigc verify: issue 16)

cli_credentials.register(app)


if __name__ == "__main__":
    main()
