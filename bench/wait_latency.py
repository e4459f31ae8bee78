"""How long ``Client.wait`` takes to learn that a job finished: the finalize step's NOTIFY (PostgreSQL
LISTEN/NOTIFY, aigc_core/notify.py) against polling alone, side by side in interleaved rounds.

A job is left open; another thread marks its items done and finalizes it at a random moment while
``wait`` runs; the lag is from the finalize commit to ``wait``'s return. Polling alone is measured
with the listening connection refused (``FinishWatch`` falls back to sleeping ``poll_s``).

    python -m bench.wait_latency [--quick] [--rounds 20] [--poll-s 0.5]
"""

from __future__ import annotations

import random
import tempfile
import threading
import time
from functools import partial
from unittest import mock

from bench.common import (
    create_database,
    drop_database,
    fmt_range,
    interleave_many,
    quick_arg,
    summary,
    table,
    verdict,
    write_json,
)

TARGET_MS = 50.0


def _lag(client, db, store, *, poll_s: float, listen: bool) -> float:
    """Milliseconds from the finalize commit to wait's return."""
    from sqlalchemy import update

    from aigc_core.jobs import finalize_if_done
    from aigc_core.schema import Item, ItemStatus, JobStatus
    from tests.support.retention_rows import make_job

    job_id = make_job(db, store, items=4, age=None, status=JobStatus.running)
    committed: list[float] = []

    def finish():
        time.sleep(random.uniform(0.1, 0.1 + poll_s))  # anywhere in a poll interval
        with db.session() as s:
            s.execute(update(Item).where(Item.job_id == job_id).values(status=ItemStatus.succeeded))
        finalize_if_done(db, store, job_id)
        committed.append(time.perf_counter())

    t = threading.Thread(target=finish)
    with mock.patch("psycopg.connect", side_effect=OSError("polling only")) if not listen else _nothing():
        t.start()
        client.wait(job_id, poll_s=poll_s, timeout=60)
        returned = time.perf_counter()
    t.join()
    return (returned - committed[0]) * 1e3


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main(argv=None) -> dict:
    from aigc_core.db import database
    from aigc_core.settings import Settings
    from aigc_core.storage import open_store
    from scheduler import Client
    from tests.support.retention_rows import WatchOnlyRunner

    p = quick_arg()
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--poll-s", type=float, default=0.5, help="Client.wait's poll interval (its default)")
    args = p.parse_args(argv)
    rounds = args.rounds or (8 if args.quick else 20)
    url = create_database()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            settings = Settings(database_url=url, storage_url=f"file://{tmp}/data")

            client = Client(settings, runner=WatchOnlyRunner())  # workers elsewhere: wait only watches
            db, store = database(url), open_store(settings.storage_url)
            lags = interleave_many(rounds, {
                "notify": partial(_lag, client, db, store, poll_s=args.poll_s, listen=True),
                "poll": partial(_lag, client, db, store, poll_s=args.poll_s, listen=False)})
    finally:
        drop_database(url)
    s = {k: summary(v) for k, v in lags.items()}
    holds = s["notify"]["median"] <= TARGET_MS
    t = table(f"Client.wait: finalize commit -> wait returns, ms, {rounds} interleaved rounds, poll_s {args.poll_s}",
              ["waiting by", "median [range] ms"],
              [["NOTIFY (PostgreSQL LISTEN)", fmt_range(s["notify"], 1)], ["polling alone", fmt_range(s["poll"], 1)]])
    result = {"rounds": rounds, "poll_s": args.poll_s, "lag_ms": s, "tables": [t],
              "targets": [{"target": f"wait hears a finish within {TARGET_MS:.0f} ms (median)",
                           "measured": s["notify"]["median"], "holds": holds}]}
    print(f"target: median lag <= {TARGET_MS:.0f} ms: {verdict(holds)}")
    write_json("wait_latency", result)
    return result


if __name__ == "__main__":
    main()
