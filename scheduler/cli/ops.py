"""Ops commands: ``aigc metrics`` (Prometheus), ``aigc flower`` and the ``aigc status`` overview."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from datetime import datetime
from typing import Annotated

import typer
from rich import box
from rich.console import Console, Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from aigc_core.errors import SpecError
from aigc_core.settings import Settings


def stdout_console() -> Console:
    """The console for a command's output. On a terminal rich fits tables to its width; in a pipe or a
    file nothing may be cut (an id ending in "…" cannot be pasted back), so lines are as long as their
    content (COLUMNS, when set, still wins)."""
    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return Console()
    return Console(width=PIPE_WIDTH)


PIPE_WIDTH = 100_000  # wide enough for any id, URI or error; a rich table takes only what it needs


out = stdout_console()
err = Console(stderr=True, soft_wrap=True)


# ---- aigc metrics -------------------------------------------------------------------------------

def metrics(
    port: Annotated[int | None, typer.Option(help="default: AIGC_METRICS_PORT, else 9808")] = None,
    host: Annotated[str, typer.Option(help="address to listen on")] = "0.0.0.0",
) -> None:
    """Serve Prometheus metrics from the database and Redis: queue depth, items and jobs by state, items/s."""
    from aigc_core.logs import setup_logging
    from scheduler.ops.metrics import serve

    settings = Settings()
    setup_logging(settings.log_json, settings.log_level or "INFO")
    port = port or settings.metrics_port or 9808
    serve(settings, port, host)
    err.print(f"metrics on http://{host}:{port}/metrics (Ctrl-C to stop)", highlight=False)
    with contextlib.suppress(KeyboardInterrupt):
        threading.Event().wait()


# ---- aigc flower --------------------------------------------------------------------------------

def _check_basic_auth(auth: str) -> str:
    pairs = [p for p in auth.split(",") if p]
    if not pairs or any(not u or not pw for u, _, pw in (p.partition(":") for p in pairs)):
        raise SpecError("AIGC_FLOWER_BASIC_AUTH: use user:password (comma-separated for several users)")
    return ",".join(pairs)


def flower_argv(port: int, address: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "worker.app", "flower", f"--port={port}", f"--address={address}"]


def flower(
    port: Annotated[int, typer.Option(help="HTTP port")] = 5555,
    address: Annotated[str, typer.Option(help="address to listen on")] = "0.0.0.0",
    unauthenticated: Annotated[bool, typer.Option("--unauthenticated",
                                                  help="run without AIGC_FLOWER_BASIC_AUTH: anyone who can "
                                                       "reach the port sees (and controls) the workers")] = False,
) -> None:
    """Run Flower against the broker (celery -A worker.app flower), behind AIGC_FLOWER_BASIC_AUTH."""
    settings = Settings()
    if not settings.broker_url:
        raise SpecError("Flower watches the broker: set AIGC_BROKER_URL (the embedded worker has none)")
    env = dict(os.environ)
    if settings.flower_basic_auth is not None:
        # Through Flower's environment, not argv: a password in argv shows in `ps`.
        env["FLOWER_BASIC_AUTH"] = _check_basic_auth(settings.flower_basic_auth.get_secret_value())
    elif not unauthenticated:
        raise SpecError("no AIGC_FLOWER_BASIC_AUTH=user:password: Flower would be open to anyone who can reach "
                        "it; set it, or pass --unauthenticated on a trusted network")
    else:
        err.print("[yellow]warning:[/yellow] Flower runs without authentication", highlight=False)
    argv = flower_argv(port, address)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, env)  # Flower's own process: its signals, its logs, no aigc in between


# ---- aigc status (no job) -----------------------------------------------------------------------

def status_overview(client, limit: int = 20, *, console: Console | None = None) -> None:
    """Queues, workers, jobs in flight with progress, the last failures and the latest jobs."""
    from scheduler.ops.overview import BrokerProbe, gather_overview

    settings = client.settings
    broker = BrokerProbe(settings.broker_url, ssl=settings.broker_ssl()) if settings.broker_url else None
    ov = gather_overview(client.db, broker, latest=client.jobs(limit))
    (console or out).print(render_overview(ov, broker_configured=broker is not None))


def _ago(at: datetime | None, now: datetime) -> str:
    if at is None:
        return "-"
    if at.tzinfo is None:  # SQLite hands timestamps back naive; they were written in UTC
        at = at.replace(tzinfo=now.tzinfo)
    s = max(0, int((now - at).total_seconds()))
    return f"{s}s" if s < 120 else f"{s // 60}m" if s < 7200 else f"{s // 3600}h" if s < 172800 else f"{s // 86400}d"


def _table(title: str, *columns: str) -> Table:
    return Table(*columns, title=title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD,
                 show_edge=False)


def _none(title: str, why: str) -> Text:
    return Text.assemble((title, "bold"), f"  {why}\n")  # a section with nothing in it is one line


def jobs_table(views, title: str | None = None) -> Table:
    t = Table("job", "kind", "model", "status", "done", "ok", "failed", "created", title=title, title_justify="left",
              title_style="bold" if title else None, box=box.SIMPLE_HEAD if title else box.HEAVY_HEAD,
              show_edge=not title)
    for v in views:
        c = v.counts
        t.add_row(v.id, v.kind, v.model, v.status.value, f"{v.done}/{v.item_count}", str(c["succeeded"]),
                  str(c["failed"]), v.created_at.strftime("%Y-%m-%d %H:%M:%S"))
    return t


def render_overview(ov, *, broker_configured: bool) -> RenderableType:
    items = "  ".join(f"{k} {n}" for k, n in ov.items.items())
    rate = sum(ov.rates.values())
    open_jobs = sum(ov.jobs.get(k, 0) for k in ("waiting", "queued", "running"))
    head = Text.assemble(("aigc status", "bold"), f"  {ov.at:%Y-%m-%d %H:%M:%S} UTC\n",
                         f"items: {items}\n", f"jobs: {open_jobs} open ({ov.jobs.get('running', 0)} running)   "
                         f"throughput: {rate:.2f} items/s over the last 60 s\n")
    parts: list[RenderableType] = [head]
    parts += [Text(f"! {p}", style="yellow") for p in ov.problems]

    q = _table("Queues", "queue", "waiting on broker", "outbox pending", "held")
    for r in ov.queues:
        q.add_row(r.name, "-" if r.depth is None else str(r.depth), str(r.outbox_pending), str(r.outbox_held))
    if ov.unacked is not None:
        q.caption = f"{ov.unacked} message{'' if ov.unacked == 1 else 's'} delivered to workers, not yet acknowledged"
    elif not broker_configured:
        q.caption = "no broker (AIGC_BROKER_URL unset): chunks wait in the database outbox"
    parts.append(q)

    if ov.workers:
        w = _table("Workers", "worker", "seen via", "running", "last item started")
        for r in ov.workers:
            running = ", ".join(r.active) if r.source == "broker" else f"{r.running_items} items"
            w.add_row(r.name, "broker (answered now)" if r.source == "broker" else "database (claimed items)",
                      running or "idle", f"{_ago(r.last_started, ov.at)} ago" if r.last_started else "-")
        if broker_configured:
            w.caption = "a solo-pool worker busy with a chunk answers the broker only between chunks"
        parts.append(w)
    else:
        parts.append(_none("Workers", "none answered, and none claimed items in the last 10 minutes"))

    if ov.in_flight:
        j = _table("Jobs in flight", "job", "kind", "model", "status", "progress", "done", "failed", "age")
        for v in ov.in_flight:
            bar = ProgressBar(total=max(v.item_count, 1), completed=v.done, width=24)
            j.add_row(v.id, v.kind, v.model, v.status.value, bar, f"{v.done}/{v.item_count}",
                      str(v.counts["failed"]), _ago(v.created_at, ov.at))
        parts.append(j)
    else:
        parts.append(_none("Jobs in flight", "none"))

    if ov.failures:
        lines = [Text("Last failures", style="bold")]
        for group in _failure_groups(ov.failures):
            x = group[0]
            lines.append(Text.assemble(
                f" {_ago(x.finished_at, ov.at)} ago  job {x.job_id}  ", ("item" if len(group) == 1 else "items", ""),
                f" {_few(str(g.index) for g in group)} ({_few(g.custom_id for g in group)})  attempt {x.attempts}"
                f"  {x.worker or '-'}"))
            reason = x.error.splitlines()[0][:300] if x.error else "(no reason recorded)"
            lines.append(Text(f"   {reason}", style="red"))
        parts.append(Group(*lines))
    else:
        parts.append(_none("Last failures", "none"))
    parts.append(jobs_table(ov.latest, title="Latest jobs"))
    spaced: list[RenderableType] = []
    for p in parts:
        spaced += [p, Text("")] if not isinstance(p, Text) else [p]
    return Group(*spaced)


def _failure_groups(failures) -> list[list]:
    """Neighbouring failures of one job with one error are one row: a model that will not load is one line."""
    groups: list[list] = []
    for x in failures:
        if groups and (groups[-1][0].job_id, groups[-1][0].error) == (x.job_id, x.error):
            groups[-1].append(x)
        else:
            groups.append([x])
    return groups


def _few(values, shown: int = 3) -> str:
    values = sorted(values, key=lambda v: (len(v), v))
    return ", ".join(values[:shown]) + (f" +{len(values) - shown}" if len(values) > shown else "")
