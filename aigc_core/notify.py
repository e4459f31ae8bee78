"""A job's end announced to whoever waits for it, so ``Client.wait`` returns within milliseconds of the
finalize step instead of at its next poll.

On PostgreSQL the finalize transaction sends ``NOTIFY`` on the job's own channel; PostgreSQL delivers
it only when that transaction commits, so a waiter that hears it always reads the final status. A
waiter ``LISTEN``s before it reads the status, so a job that ends between the read and the wait is
not missed. Elsewhere (SQLite, or a listening connection that cannot be opened) waiting is polling,
as before: the notification only ever shortens a wait.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from types import TracebackType
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from aigc_core.db import Database

log = logging.getLogger("aigc.notify")

_JOB_ID = re.compile(r"[0-9a-f]{32}")


def channel(job_id: str) -> str:
    """The job's channel name (an identifier: a job id is 32 hex digits, server-made)."""
    if not _JOB_ID.fullmatch(job_id):
        raise ValueError(f"not a job id: {job_id!r}")
    return f"aigc_job_{job_id}"


def notify_finished(s: Session, job_id: str, status: str) -> None:
    """Inside the transaction that makes the job final: delivered to listeners when it commits."""
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text("SELECT pg_notify(:channel, :status)"), {"channel": channel(job_id), "status": status})


class FinishWatch:
    """``wait(seconds)`` sleeps until the job's end is announced or the time is up (True when announced).
    Use as a context manager; the listening connection is a dedicated one, closed on exit."""

    def __init__(self, db: Database, job_id: str):
        self._conn: Any = None
        if db.engine.dialect.name != "postgresql":
            return
        try:
            import psycopg

            url = db.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
            self._conn = psycopg.connect(url, autocommit=True, connect_timeout=5)
            self._conn.execute(f'LISTEN "{channel(job_id)}"')
        except Exception as e:  # waiting still works: it polls
            log.info("waiting by polling: could not listen for the job's end (%s)", type(e).__name__)
            self.close()

    @property
    def listening(self) -> bool:
        return self._conn is not None

    def wait(self, seconds: float) -> bool:
        if self._conn is None:
            time.sleep(seconds)
            return False
        try:
            return any(True for _ in self._conn.notifies(timeout=max(0.0, seconds), stop_after=1))
        except Exception as e:  # the connection dropped: poll from now on
            log.info("waiting by polling: the listening connection failed (%s)", type(e).__name__)
            self.close()
            return False

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # closing a dropped connection may raise
                conn.close()

    def __enter__(self) -> FinishWatch:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
