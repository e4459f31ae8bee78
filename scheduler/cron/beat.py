"""``aigc scheduler``: Celery beat for the cron schedules and the reconciler.

Beat has two periodic entries, ``scheduler.tick`` every ``AIGC_SCHEDULER_TICK_S`` (fires the due
slots of every schedule, see ``scheduler.cron.schedules``) and ``scheduler.reconcile`` every
``AIGC_RECONCILE_EVERY_S``. They are not cron entries per schedule: a tick reads the schedules from
the database, so ``aigc schedules pause`` or an edited schedules.yaml takes effect at the next tick
without restarting beat, and slots missed while no beat ran are found from the database cursor.
With ``AIGC_GC_OLDER_THAN`` set, a third entry, ``scheduler.gc`` every ``AIGC_GC_EVERY_S``, removes
finished jobs older than that (aigc_core/retention.py) in a thread, so it never delays a tick.

Where the ticks run: on a Celery app of their own (``aigc-scheduler``, JSON only) whose worker
consumes only the ``scheduler`` queue, started by ``aigc scheduler`` in the same process as beat
(``worker -B``, solo pool). Not on the generation workers: those import torch and may be busy with
a chunk for minutes, while a tick must be on time and torch-free (it calls ``Client.submit``). As
tasks they show in Flower like any other. Two ``aigc scheduler`` processes (a rolling restart, a
spare) each send ticks and either worker may run them: that is fine, because a slot is fired once
by its unique ``ScheduleRun`` row and the job's idempotency key, never by there being one beat.
Beat keeps no state file (``celery.beat:Scheduler``, in memory) and tick messages expire after one
period, so a backlog never turns into a burst. Without ``AIGC_BROKER_URL`` the same two functions
run in a plain loop.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from aigc_core.errors import SpecError
from aigc_core.settings import Settings

log = logging.getLogger("aigc.scheduler")

QUEUE = "scheduler"
STALE_S = 300.0  # a run pending this long is taken over by another tick
_state: dict[str, Any] = {}


def make_app(settings: Settings):
    from celery import Celery

    app = Celery("aigc-scheduler", broker=settings.broker_url)
    app.conf.update(
        task_serializer="json", result_serializer="json", event_serializer="json", accept_content=["json"],
        task_ignore_result=True, task_default_queue=QUEUE, worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True, broker_use_ssl=settings.broker_ssl(),
        beat_scheduler="celery.beat:Scheduler",  # in memory: catch-up is the database's business
        beat_max_loop_interval=max(1.0, min(settings.scheduler_tick_s, 5.0)),
        beat_schedule={
            "schedules-tick": {"task": "scheduler.tick", "schedule": settings.scheduler_tick_s,
                               "options": {"queue": QUEUE, "expires": settings.scheduler_tick_s}},
            "reconcile": {"task": "scheduler.reconcile", "schedule": settings.reconcile_every_s,
                          "options": {"queue": QUEUE, "expires": settings.reconcile_every_s}},
        },
    )
    app.task(name="scheduler.tick")(tick)
    app.task(name="scheduler.reconcile")(reconcile)
    if settings.gc_older_than.strip():  # retention: off unless AIGC_GC_OLDER_THAN is set
        app.conf.beat_schedule["gc"] = {"task": "scheduler.gc", "schedule": settings.gc_every_s,
                                        "options": {"queue": QUEUE, "expires": settings.gc_every_s}}
        app.task(name="scheduler.gc")(gc)
    return app


def _client():
    if "client" not in _state:
        from scheduler.client import Client

        _state["client"] = Client(Settings())
    return _state["client"]


def tick() -> dict[str, Any]:
    """Sync schedules.yaml if it changed, then fire every due slot."""
    from scheduler.cron.schedules import fire_due

    client = _client()
    _resync_if_changed(client)
    fired = fire_due(client, grace_s=client.settings.scheduler_grace_s, stale_s=STALE_S)
    return {"fired": [f"{f.schedule} {f.slot} {f.outcome.value} {f.job_id or f.error or ''}".strip()
                      for f in fired]}


def reconcile() -> dict[str, Any]:
    rep = _client().reconcile()
    return {"published": rep.published, "expired_leases": rep.expired_leases, "stale_chunks": rep.stale_chunks,
            "finalized": len(rep.finalized), "released": rep.released}


def gc() -> dict[str, Any]:
    """Retention (``AIGC_GC_OLDER_THAN``): start removing old finished jobs in a thread of this process
    and return at once, so a gc of a million items never delays a schedule tick; one run at a time."""
    import threading

    from aigc_core.retention import parse_age

    client = _client()
    age = client.settings.gc_older_than.strip()
    if not age:
        return {"gc": "off (AIGC_GC_OLDER_THAN is empty)"}
    running = _state.get("gc_thread")
    if running is not None and running.is_alive():
        return {"gc": "still running"}
    older_than = parse_age(age)
    t = threading.Thread(target=_gc_run, args=(client, older_than), name="aigc-gc", daemon=True)
    _state["gc_thread"] = t
    t.start()
    return {"gc": f"started: jobs finished more than {age} ago", "objects": client.settings.gc_objects}


def _gc_run(client, older_than) -> None:
    from aigc_core.retention import collect_garbage

    try:
        rep = collect_garbage(client.db, client.store, older_than, objects=client.settings.gc_objects,
                              progress=log.info)
        log.info("%s", rep.line())
    except Exception:  # the next period tries again; a half-done run is safe (objects before rows)
        log.exception("gc failed")


def sync_file(client, path: str) -> dict[str, str]:
    """Load, validate and store schedules.yaml; a bad file raises SpecError and changes nothing."""
    from scheduler.cron.schedules import load_schedules_file, sync_schedules

    result = sync_schedules(client.db, load_schedules_file(path))
    _state["file_sig"] = _signature(path)
    return result


def _signature(path: str) -> tuple[int, int] | None:
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def _resync_if_changed(client) -> None:
    path = client.settings.schedules_file
    if not path or _signature(path) == _state.get("file_sig"):
        return
    _state["file_sig"] = _signature(path)  # a bad edit is reported once, and the old schedules stay
    try:
        changes = sync_file(client, path)
        log.info("schedules file %s synced: %s", path, changes)
    except SpecError as e:
        log.error("schedules file %s not applied: %s", path, e)


def serve(settings: Settings, *, loglevel: str = "INFO") -> None:
    """Sync the schedules file (a bad one stops here), then run beat and the tick worker, or a loop."""
    from aigc_core.logs import hook_celery, setup_logging
    from scheduler.client import Client

    setup_logging(settings.log_json, settings.log_level or loglevel)
    hook_celery(settings.log_json)
    client = _state["client"] = Client(settings)
    if settings.schedules_file:
        log.info("schedules: %s", sync_file(client, settings.schedules_file))
    if settings.metrics_port:  # the database and queue gauges, as `aigc metrics` serves them
        from scheduler.ops.metrics import serve as serve_metrics

        serve_metrics(settings, settings.metrics_port)
    if not settings.broker_url:
        _loop(settings)
        return
    client.db.engine.dispose()  # the embedded beat is a forked process: no pooled connection crosses it
    make_app(settings).worker_main([
        "worker", "-B", "-Q", QUEUE, "--pool", "solo", "--loglevel", loglevel, "-E",
        "-n", f"scheduler-{os.getpid()}@%h", "--without-gossip", "--without-mingle",
    ])


def _loop(settings: Settings) -> None:
    log.info("no AIGC_BROKER_URL: ticking every %ss in this process", settings.scheduler_tick_s)
    next_reconcile = next_gc = 0.0
    while True:
        started = time.monotonic()
        gc_due = bool(settings.gc_older_than.strip()) and started >= next_gc
        for due, fn in ((True, tick), (started >= next_reconcile, reconcile), (gc_due, gc)):
            if not due:
                continue
            try:
                log.info("%s: %s", fn.__name__, fn())
            except Exception:  # a database hiccup must not end the loop; the next tick retries
                log.exception("%s failed", fn.__name__)
        if started >= next_reconcile:
            next_reconcile = started + settings.reconcile_every_s
        if gc_due:
            next_gc = started + settings.gc_every_s
        time.sleep(max(0.0, settings.scheduler_tick_s - (time.monotonic() - started)))
