"""Streaming submit at scale: ``python -m bench.stream_submit [--items 1000000] [--quick]``.

Each size runs in a fresh process (so its peak RSS is its own) against a PostgreSQL database of its
own (``aigc_bench_submit``, dropped at the end), with a null model registered: ``Client.submit`` of a
generator of N items, then the publish of its chunks into the outbox (no broker: the outbox rows
stay pending; with ``--broker`` they are published to Redis, as a deployment's submit does). It
prints seconds, items per second and the process's peak RSS growth per size, and
the ratios between the largest and the smallest size: time should grow with N and memory should
not. Targets (issue 19): a 1M-item job submits in <= 45 s with <= 300 MB client peak.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import create_engine, text

PG = os.environ.get("AIGC_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
DB = "aigc_bench_submit"


def _admin(sql: str) -> None:
    eng = create_engine(PG.replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(text(sql))
    eng.dispose()


BROKER = os.environ.get("AIGC_BENCH_REDIS_URL", "redis://127.0.0.1:6379") + "/1"  # the benchmarks' Redis db


def one(n: int, broker: bool = False) -> dict[str, float]:
    """Runs in its own process: submit n items from a generator, return time and peak RSS growth."""
    from scheduler import Client

    url = PG.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1) + f"/{DB}"
    tmp = Path(tempfile.mkdtemp(prefix="aigc-bench-submit-"))
    (tmp / "null").mkdir()
    client = Client(database_url=url, storage_url=tmp.as_uri(), broker_url=BROKER if broker else None,
                    backends="null=bench.null:NullGenerator")
    from aigc_core.db import Database

    Database(url).upgrade()
    client.register_model("null", "text", (tmp / "null").as_uri(), backend="null")
    items = ({"custom_id": f"c{i:08d}", "prompt": f"Headline number {i}: what happened next"} for i in range(n))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    view = client.submit("text", model="null", items=items, seed=1)
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert view.item_count == n, view
    if broker:
        import redis

        redis.Redis.from_url(BROKER).flushdb()  # the published messages: no worker will take them
    return {"items": n, "seconds": secs, "items_per_s": n / secs, "rss_growth_mb": (peak - before) / 1024,
            "peak_rss_mb": peak / 1024}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.stream_submit")
    p.add_argument("--items", type=int, default=1_000_000, help="the largest job (default 1,000,000)")
    p.add_argument("--quick", action="store_true", help="largest job 100,000 items")
    p.add_argument("--broker", action="store_true",
                   help="publish the chunks to Redis (db 1, flushed after) as a deployment's submit does")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args.broker)))
        return {}
    top = 100_000 if args.quick else args.items
    sizes = sorted({max(10_001, top // 10), top})
    # With --broker each size runs without and with publishing, one after the other: the difference
    # is what publishing the chunks costs, measured side by side.
    variants = [False, True] if args.broker else [False]
    runs = []
    for n in sizes:
        for broker in variants:
            _admin(f"DROP DATABASE IF EXISTS {DB}")
            _admin(f"CREATE DATABASE {DB}")
            try:
                out = subprocess.run([sys.executable, "-m", "bench.stream_submit", "--one", str(n),
                                      *(["--broker"] if broker else [])], check=True,
                                     capture_output=True, text=True).stdout
            finally:
                _admin(f"DROP DATABASE IF EXISTS {DB}")
            runs.append({**json.loads(out.strip().splitlines()[-1]), "broker": broker})
    print(f"{'items':>10} {'published':>9} {'seconds':>8} {'items/s':>9} {'peak RSS growth MB':>19} "
          f"{'peak RSS MB':>12}")
    for r in runs:
        print(f"{r['items']:>10,} {'yes' if r['broker'] else 'no':>9} {r['seconds']:>8.1f} {r['items_per_s']:>9,.0f} "
              f"{r['rss_growth_mb']:>19.0f} {r['peak_rss_mb']:>12.0f}")
    plain = [r for r in runs if not r["broker"]]
    small, big = plain[0], plain[-1]
    print(f"{big['items'] // small['items']}x the items: {big['seconds'] / small['seconds']:.2f}x the time, "
          f"{big['peak_rss_mb'] / small['peak_rss_mb']:.2f}x the peak RSS")
    for n in sizes if args.broker else []:
        a, b = (next(r for r in runs if r["items"] == n and r["broker"] is v) for v in (False, True))
        print(f"{n:,} items: publishing {-(-n // 32):,} chunk messages added {b['seconds'] - a['seconds']:.1f} s "
              f"({b['seconds'] / a['seconds']:.2f}x)")
    return {"runs": runs}


if __name__ == "__main__":
    main()
