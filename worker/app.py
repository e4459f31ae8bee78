"""The Celery app: JSON only, acks late, reject on worker lost, prefetch 1, task events on.

Run it with ``aigc worker`` or ``celery -A worker.app worker -Q text``; watch it with ``aigc flower``.
Worker processes log with job fields (``AIGC_LOG_JSON``) and serve Prometheus metrics when
``AIGC_WORKER_METRICS_PORT`` is set: each process on the first free port from there up.
"""

from __future__ import annotations

from celery import Celery, signals

from aigc_core.logs import hook_celery
from aigc_core.settings import Settings


def make_app(settings: Settings | None = None) -> Celery:
    settings = settings or Settings()
    app = Celery("aigc", broker=settings.broker_url or "memory://", include=["worker.tasks"])
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],  # pickle is never accepted
        event_serializer="json",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_default_queue="text",
        task_track_started=False,
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        # Redis re-delivers an unacked message after this; it must outlast the longest chunk.
        # kombu sweeps for unacked messages past that timeout only every interval x throttle seconds
        # (100 s by default); sweep every few seconds so the timeout means what it says.
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout_s // 2)),
            "unacked_restore_throttle": 1,
        },
        broker_use_ssl=settings.broker_ssl(),  # rediss://: certificates verified (AIGC_BROKER_SSL_*)
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


_settings = Settings()
app = make_app(_settings)
hook_celery(_settings.log_json)


@signals.worker_process_init.connect(weak=False)
def _metrics_in_pool_process(**_) -> None:
    """A prefork child, or the solo pool's only process: serve this process's metrics."""
    from worker.metrics import start_server

    start_server(Settings().worker_metrics_port)


@signals.worker_ready.connect(weak=False)
def _metrics_in_main_process(sender=None, **_) -> None:
    """The threads pool runs tasks in the main process; a prefork parent runs none and serves nothing."""
    if type(getattr(sender, "pool", None)).__module__ != "celery.concurrency.prefork":
        from worker.metrics import start_server

        start_server(Settings().worker_metrics_port)
