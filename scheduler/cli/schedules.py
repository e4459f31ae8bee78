"""``aigc scheduler`` and ``aigc schedules``: cron schedules from schedules.yaml, stored in the database."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from aigc_core.errors import SpecError
from aigc_core.settings import Settings
from scheduler.cli.ops import stdout_console

out = stdout_console()
err = Console(stderr=True, soft_wrap=True)


def _client():
    from scheduler.client import Client

    return Client()

# ---- cron schedules ---------------------------------------------------------------------------

schedules_app = typer.Typer(no_args_is_help=True, help="Cron schedules: schedules.yaml, stored in the database.")


def scheduler(
    schedules: Annotated[Path | None, typer.Option("--schedules", help="schedules.yaml (default: "
                                                      "AIGC_SCHEDULES_FILE)")] = None,
    loglevel: str = "INFO",
) -> None:
    """Run Celery beat with the cron schedules and the reconciler, and the worker that runs their ticks."""
    from scheduler.cron.beat import serve

    settings = Settings()
    if schedules is not None:
        settings = settings.model_copy(update={"schedules_file": str(schedules)})
    serve(settings, loglevel=loglevel)


@schedules_app.command("sync")
def schedules_sync(
    file: Annotated[Path | None, typer.Argument(help="default: AIGC_SCHEDULES_FILE")] = None,
    prune: Annotated[bool, typer.Option("--prune", help="also disable the schedules in the database that FILE "
                                                        "does not name")] = False,
) -> None:
    """Validate schedules.yaml and store it now (`aigc scheduler` also does, at start and on change, and
    prunes with its own file). Schedules the file does not name are disabled only with --prune."""
    from scheduler.cron.schedules import load_schedules_file, schedules_not_in, sync_schedules

    path = file or Settings().schedules_file
    if not path:
        raise SpecError("no schedules file: give FILE or set AIGC_SCHEDULES_FILE")
    client = _client()
    defs = load_schedules_file(str(path), settings=client.settings)
    for name, change in sync_schedules(client.db, defs, prune=prune).items():
        out.print(f"{name}: {change}", highlight=False)
    if not prune and (others := schedules_not_in(client.db, [d.name for d in defs])):
        shown = ", ".join(others[:10]) + (f" and {len(others) - 10} more" if len(others) > 10 else "")
        one = len(others) == 1
        err.print(f"{len(others)} schedule{'' if one else 's'} in the database {'is' if one else 'are'} not in {path} "
                  f"({shown}) and stay{'s' if one else ''} enabled; `aigc schedules sync {path} --prune` would "
                  f"disable {'it' if one else 'them'}", highlight=False)


@schedules_app.command("list")
def schedules_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Every schedule: state, cron, catch-up, last and next slot, last run."""
    from scheduler.cron.admin import schedule_views

    views = schedule_views(_client().db)
    if as_json:
        out.print_json(json.dumps(views))
        return
    t = Table("schedule", "state", "cron", "timezone", "catch-up", "max", "last slot", "next slot", "last run")
    for v in views:
        t.add_row(v["name"], v["state"], v["cron"], v["timezone"], _catchup(v), str(v["max_concurrent"]),
                  v["last_slot"] or "-", v["next_slot"] or "-", _run_line(v["last_run"]))
    out.print(t)


@schedules_app.command("show")
def schedules_show(name: str, runs: int = 20, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """One schedule, its job template and its latest runs: slot, job, outcome."""
    from scheduler.cron.admin import schedule_detail

    v = schedule_detail(_client().db, name, runs=runs)
    if as_json:
        out.print_json(json.dumps(v))
        return
    out.print(f"{v['name']}  [bold]{v['state']}[/bold]  {v['cron']} ({v['timezone']})  catch-up {_catchup(v)}  "
              f"max_concurrent {v['max_concurrent']}  last {v['last_slot'] or '-'}  next {v['next_slot'] or '-'}",
              highlight=False)
    out.print(f"job: {json.dumps(v['template'], ensure_ascii=False)}", highlight=False)
    t = Table("slot", "outcome", "job", "job status", "error")
    for r in v["runs"]:
        t.add_row(r["slot"] + (" (run-now)" if r["manual"] else ""), r["outcome"], r["job_id"] or "-",
                  r["job_status"] or "-", r["error"] or "")
    out.print(t)


@schedules_app.command("pause")
def schedules_pause(name: str) -> None:
    """Stop firing NAME (survives restarts and re-syncs) until `resume`."""
    from scheduler.cron.admin import pause

    out.print(f"{name} paused since {pause(_client().db, name)['paused_at']}", highlight=False)


@schedules_app.command("resume")
def schedules_resume(name: str) -> None:
    """Fire NAME again from its next slot; slots during the pause are not caught up."""
    from scheduler.cron.admin import resume

    v = resume(_client().db, name)
    out.print(f"{name} {v['state']}; next slot {v['next_slot'] or '-'}", highlight=False)


@schedules_app.command("run-now")
def schedules_run_now(name: str) -> None:
    """Fire NAME once now, outside its cron (even if paused); prints the job id."""
    from scheduler.cron.admin import run_now

    f = run_now(_client(), name)
    out.print(f"{f.job_id or '-'}  {f.schedule} {f.slot} {f.outcome.value}" + (f": {f.error}" if f.error else ""),
              highlight=False)
    if f.outcome.value == "failed":
        raise typer.Exit(1)


def _catchup(v: dict[str, Any]) -> str:
    return f"all (cap {v['catchup_cap']})" if v["catchup"] == "all" else v["catchup"]


def _run_line(r: dict[str, Any] | None) -> str:
    return "-" if r is None else f"{r['slot']} {r['outcome']} {r['job_id'] or ''}".strip()

