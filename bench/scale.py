"""Scale: what monitoring, the reconciler, finalize and gc cost as the items table grows, with the
same 100k items open at every size. Synthetic rows (INSERT ... SELECT generate_series) in a
PostgreSQL database of its own (``aigc_scale``, dropped at the end); nothing runs a model.

    python -m bench.scale            # 100k, 1M and 5M items (about 15 minutes here)
    python -m bench.scale --quick    # 100k and 1M
    python -m bench.scale --finalize-job 1000000   # one 1M-item job finalized into S3 (SeaweedFS)

At each size: the SQL behind ``aigc status`` (scheduler/ops gather_overview, no broker), one metrics
scrape's queries (AigcCollector.collect, no broker), one reconciler pass (nothing to publish: the
queries it runs every period), and finalize of a fresh 100k-item job (manifest streamed to a local
folder; its peak RSS growth sampled). At the largest size, gc of the oldest 1M finished items, with
a running job committing beside it (its slowest commit is reported).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from bench.common import PG_ADMIN_URL, table, verdict, write_json

DB_NAME = "aigc_scale"
OPEN_ITEMS = 100_000
JOB_ITEMS = 10_000  # items per synthetic job
CHUNK = 32
ROUNDS = 5
JOBS_PER_INSERT = 20  # 200k items per statement

PROVENANCE = ('{"model": "null@1", "backend": "null", "seed": 1, "params": {"max_new_tokens": {"value": 32, '
              '"source": "job"}}, "versions": {"aigc_runner": "0.1.0"}}')


def _admin():
    from aigc_core.db import normalize_url

    return create_engine(normalize_url(PG_ADMIN_URL), isolation_level="AUTOCOMMIT")


def create_scale_db() -> str:
    from aigc_core.db import Database

    admin = _admin()
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)'))
        c.execute(text(f'CREATE DATABASE "{DB_NAME}"'))
    admin.dispose()
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{DB_NAME}"
    db = Database(url)
    db.upgrade()
    db.engine.dispose()
    return url


def drop_scale_db() -> None:
    from aigc_core.db import database

    database.cache_clear()
    admin = _admin()
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)'))
    admin.dispose()


# ---- synthetic rows -----------------------------------------------------------------------------------

_JOB_COLS = ("id, kind, model_name, model_version, queue, status, params, seed, metadata, payload_digest, "
             "item_count, chunk_size, depends_on, created_at, started_at, finished_at, succeeded_items, "
             "failed_items, cancelled_items")


def add_finished_jobs(db, tag: str, n_jobs: int, items_per_job: int = JOB_ITEMS) -> list[str]:
    """Finished jobs (1% of items failed), finished 1-60 days ago, with artifacts, done chunks, events."""
    ids = []
    failed = len(range(7, items_per_job, 100))
    for start in range(0, n_jobs, JOBS_PER_INSERT):
        batch = [f"{tag}-{j}" for j in range(start, min(n_jobs, start + JOBS_PER_INSERT))]
        params = {"keys": batch, "n": items_per_job, "chunks": (items_per_job + CHUNK - 1) // CHUNK,
                  "ok": items_per_job - failed, "failed": failed}
        with db.engine.begin() as c:
            c.execute(text("SET LOCAL synchronous_commit TO off"))  # synthetic fill only; measurements commit as usual
            c.execute(text(f"""
                INSERT INTO jobs ({_JOB_COLS})
                SELECT md5(k), 'text', 'null', 1, 'text', 'partially_failed', '{{}}', 1, '{{}}', md5(k || 'p'),
                       :n, {CHUNK}, '[]', f - interval '10 minutes', f - interval '9 minutes', f, :ok, :failed, 0
                FROM (SELECT k, now() - interval '1 day' - (hashtext(k) & 1023) * interval '80 minutes' AS f
                      FROM unnest(CAST(:keys AS text[])) AS k) t"""), params)
            jobs = "SELECT id, finished_at FROM jobs WHERE id IN (SELECT md5(k) FROM unnest(CAST(:keys AS text[])) k)"
            c.execute(text(f"""
                INSERT INTO items (job_id, index, chunk_no, custom_id, prompt, params, seed, status, attempts,
                                   worker, error, started_at, finished_at)
                SELECT j.id, g, g / {CHUNK}, 'c' || g, 'Headline number ' || g || ' of the day', '{{}}', g,
                       CASE WHEN g % 100 = 7 THEN 'failed' ELSE 'succeeded' END, 1, 'host:' || (g % 8),
                       CASE WHEN g % 100 = 7 THEN 'the backend exploded' END,
                       j.finished_at - interval '1 minute', j.finished_at
                FROM ({jobs}) j, generate_series(0, :n - 1) g"""), params)
            c.execute(text(f"""
                INSERT INTO artifacts (item_id, job_id, key, uri, sha256, size, media_type, provenance, created_at)
                SELECT i.id, i.job_id, 'jobs/' || i.job_id || '/items/' || lpad(i.index::text, 6, '0') || '.t.txt',
                       's3://bench/jobs/' || i.job_id || '/items/' || lpad(i.index::text, 6, '0') || '.t.txt',
                       md5(i.id::text) || md5(i.job_id), 120, 'text/plain; charset=utf-8', '{PROVENANCE}',
                       i.finished_at
                FROM items i WHERE i.job_id IN (SELECT id FROM ({jobs}) j) AND i.status = 'succeeded'"""), params)
            c.execute(text(f"""
                INSERT INTO chunks (job_id, chunk_no, status, publish_count, published_at, created_at)
                SELECT j.id, g, 'done', 1, j.finished_at - interval '9 minutes', j.finished_at - interval '10 minutes'
                FROM ({jobs}) j, generate_series(0, :chunks - 1) g"""), params)
            c.execute(text(f"""
                INSERT INTO job_events (job_id, at, type, data)
                SELECT j.id, j.finished_at, 'finished', '{{"status": "partially_failed"}}' FROM ({jobs}) j"""), params)
        ids += batch
    return ids


def add_open_jobs(db, n_items: int) -> None:
    """Running jobs: each 90% pending (chunks published a minute ago), 5% running, 5% succeeded just now."""
    n_jobs = n_items // JOB_ITEMS
    keys = [f"open-{j}" for j in range(n_jobs)]
    params = {"keys": keys, "n": JOB_ITEMS, "chunks": JOB_ITEMS // CHUNK}
    jobs = "SELECT id FROM jobs WHERE id IN (SELECT md5(k) FROM unnest(CAST(:keys AS text[])) k)"
    with db.engine.begin() as c:
        c.execute(text(f"""
            INSERT INTO jobs ({_JOB_COLS})
            SELECT md5(k), 'text', 'null', 1, 'text', 'running', '{{}}', 1, '{{}}', md5(k || 'p'), :n, {CHUNK}, '[]',
                   now() - interval '5 minutes', now() - interval '4 minutes', NULL, NULL, NULL, NULL
            FROM unnest(CAST(:keys AS text[])) AS k"""), params)
        c.execute(text(f"""
            INSERT INTO items (job_id, index, chunk_no, custom_id, prompt, params, seed, status, attempts, claim_token,
                               lease_until, worker, started_at, finished_at)
            SELECT j.id, g, g / {CHUNK}, 'c' || g, 'Headline number ' || g, '{{}}', g,
                   CASE WHEN g % 20 = 0 THEN 'running' WHEN g % 20 = 1 THEN 'succeeded' ELSE 'pending' END,
                   CASE WHEN g % 20 < 2 THEN 1 ELSE 0 END,
                   CASE WHEN g % 20 = 0 THEN md5(j.id || (g / {CHUNK})) END,
                   CASE WHEN g % 20 = 0 THEN now() + interval '10 minutes' END,
                   CASE WHEN g % 20 < 2 THEN 'host:' || (g % 8) END,
                   CASE WHEN g % 20 < 2 THEN now() - interval '30 seconds' END,
                   CASE WHEN g % 20 = 1 THEN now() - interval '20 seconds' END
            FROM ({jobs}) j, generate_series(0, :n - 1) g"""), params)
        c.execute(text(f"""
            INSERT INTO chunks (job_id, chunk_no, status, publish_count, published_at, created_at)
            SELECT j.id, g, 'published', 1, now() - interval '1 minute', now() - interval '5 minutes'
            FROM ({jobs}) j, generate_series(0, :chunks) g"""), params)


def analyze(db) -> None:
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.execute(text("VACUUM ANALYZE"))


# ---- measurements ---------------------------------------------------------------------------------------

def median_s(fn: Callable[[], Any], rounds: int = ROUNDS) -> float:
    fn()  # warm: plans and pages in cache, as a scrape every 15 s finds them
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def overview(db) -> None:
    from scheduler.ops.overview import gather_overview

    gather_overview(db, None, latest=[])


def scrape(db) -> None:
    from scheduler.ops.metrics import AigcCollector

    list(AigcCollector(db, None).collect())


def reconcile_pass(db, store) -> None:
    from aigc_core.reconcile import reconcile

    rep = reconcile(db, store, lambda *a: None, stale_after_s=3600)
    assert not rep.finalized and rep.published == 0, rep


class RssPeak:
    """The process's resident memory, sampled every 20 ms; ``growth_mb`` is the peak over the start."""

    def __init__(self):
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    @staticmethod
    def _rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def growth_mb(self) -> float:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())
        return (self.peak - self.start) / 2**20


def finalize_100k(db, store) -> tuple[float, float]:
    """A fresh 100k-item job with every item final, finalized (manifest and errors streamed)."""
    from aigc_core.jobs import finalize_if_done

    key = f"fin-{time.monotonic_ns()}"
    add_finished_jobs(db, key, 1, items_per_job=100_000)
    with db.engine.begin() as c:  # as the last chunk leaves it: all items final, the job not yet
        job_id = c.execute(text("UPDATE jobs SET finished_at = NULL, status = 'running', succeeded_items = NULL, "
                                "failed_items = NULL, cancelled_items = NULL WHERE id = md5(:k) RETURNING id"),
                           {"k": f"{key}-0"}).scalar_one()
    mem = RssPeak()
    t0 = time.perf_counter()
    status = finalize_if_done(db, store, job_id)
    seconds = time.perf_counter() - t0
    growth = mem.growth_mb()
    assert status is not None and status.value == "partially_failed", status
    assert len(store.get(f"jobs/{job_id}/manifest.jsonl").splitlines()) == 100_000
    with db.engine.begin() as c:  # not part of the measured table sizes
        c.execute(text("DELETE FROM jobs WHERE id = :j"), {"j": job_id})
    return seconds, growth


def gc_1m(db, finished_ids: list[str]) -> dict[str, float]:
    """gc of the oldest 1M finished items (100 jobs made 400 days old), a running job committing beside."""
    from aigc_core.retention import collect_garbage

    victims = finished_ids[: 1_000_000 // JOB_ITEMS]
    with db.engine.begin() as c:
        c.execute(text("UPDATE jobs SET finished_at = now() - interval '400 days' "
                       "WHERE id IN (SELECT md5(k) FROM unnest(CAST(:keys AS text[])) k)"), {"keys": victims})
        running = c.execute(text("SELECT id FROM jobs WHERE finished_at IS NULL LIMIT 1")).scalar_one()
    latencies: list[float] = []
    stop = threading.Event()

    def commits() -> None:  # a worker's commit every 10 ms: how long does gc make it wait?
        n = 0
        while not stop.is_set():
            t0 = time.perf_counter()
            with db.engine.begin() as c:
                c.execute(text("UPDATE items SET lease_until = now() + interval '10 minutes' "
                               "WHERE job_id = :j AND index = :i"), {"j": running, "i": (n * 20) % JOB_ITEMS})
            latencies.append(time.perf_counter() - t0)
            n += 1
            time.sleep(0.01)

    t = threading.Thread(target=commits, daemon=True)
    t.start()
    t0 = time.perf_counter()
    rep = collect_garbage(db, None, timedelta(days=365), progress=lambda line: print("  " + line, flush=True))
    seconds = time.perf_counter() - t0
    stop.set()
    t.join()
    assert rep.jobs == len(victims) and rep.items == len(victims) * JOB_ITEMS, rep.line()
    latencies.sort()
    return {"seconds": seconds, "items": rep.items, "commit_max_s": latencies[-1],
            "commit_p99_s": latencies[int(len(latencies) * 0.99)], "commits": len(latencies)}


def table_sizes(db) -> dict[str, float]:
    with db.engine.connect() as c:
        rows = c.execute(text("SELECT relname, pg_total_relation_size(oid) FROM pg_class WHERE relname IN "
                              "('items', 'artifacts', 'chunks', 'jobs')")).all()
    return {name: size / 2**20 for name, size in rows}


def finalize_big(n_items: int) -> int:
    """One n-item job finalized into a real S3 server (SeaweedFS): seconds, peak RSS growth, parts."""
    from aigc_core.db import Database
    from aigc_core.jobs import finalize_if_done
    from aigc_core.storage import S3Store
    from tests.support.s3server import start_s3_server

    tmp = Path(tempfile.mkdtemp(prefix="aigc-bench-scale-"))
    s3 = start_s3_server(tmp / "s3")
    url = create_scale_db()
    try:
        s3.create_bucket("scale")
        os.environ.update(s3.env)
        db = Database(url)
        add_finished_jobs(db, "big", 1, items_per_job=n_items)
        analyze(db)
        with db.engine.begin() as c:
            job_id = c.execute(text("UPDATE jobs SET finished_at = NULL, status = 'running', succeeded_items = NULL, "
                                    "failed_items = NULL, cancelled_items = NULL RETURNING id")).scalar_one()
        store = S3Store("scale", endpoint_url=s3.endpoint)
        mem = RssPeak()
        t0 = time.perf_counter()
        finalize_if_done(db, store, job_id)
        seconds = time.perf_counter() - t0
        growth = mem.growth_mb()
        head = s3.client().head_object(Bucket="scale", Key=f"jobs/{job_id}/manifest.jsonl")
        db.engine.dispose()
    finally:
        drop_scale_db()
        s3.stop()
    parts = head["ETag"].strip('"').rpartition("-")[2] if "-" in head["ETag"] else "1"
    size = f"{head['ContentLength'] / 2**20:.0f} MiB"
    table(f"Finalize of one {n_items:,}-item job into S3 (SeaweedFS)",
          ["seconds", "peak RSS growth", "manifest", "parts"], [[f"{seconds:.1f}", f"{growth:.1f} MB", size, parts]])
    write_json("scale_finalize", {"items": n_items, "seconds": seconds, "rss_growth_mb": growth,
                                  "manifest_bytes": head["ContentLength"], "parts": parts})
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scale")
    p.add_argument("--quick", action="store_true", help="stop at 1M items")
    p.add_argument("--sizes", help="item totals, comma-separated (default 100000,1000000,5000000)")
    p.add_argument("--finalize-job", type=int, metavar="N",
                   help="instead: finalize one N-item job into SeaweedFS (time, memory, multipart parts)")
    args = p.parse_args(argv)
    if args.finalize_job:
        return finalize_big(args.finalize_job)
    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else [100_000, 1_000_000, 5_000_000]
    if args.quick:
        sizes = [n for n in sizes if n <= 1_000_000]
    from aigc_core.db import Database
    from aigc_core.storage import LocalStore

    url = create_scale_db()
    tmp = Path(tempfile.mkdtemp(prefix="aigc-bench-scale-"))
    results: dict[int, dict[str, Any]] = {}
    try:
        db = Database(url)
        store = LocalStore(tmp)
        add_open_jobs(db, OPEN_ITEMS)
        finished: list[str] = []
        for size in sizes:
            t0 = time.perf_counter()
            need = (size - OPEN_ITEMS) // JOB_ITEMS - len(finished)
            if need > 0:
                finished += add_finished_jobs(db, f"done{len(finished)}", need)
            analyze(db)
            fill = time.perf_counter() - t0
            print(f"{size:,} items ({len(finished) * JOB_ITEMS:,} finished, {OPEN_ITEMS:,} open): "
                  f"filled in {fill:.0f} s; measuring", flush=True)
            r: dict[str, Any] = {"fill_s": fill, "sizes_mb": table_sizes(db)}
            r["overview_s"] = median_s(lambda: overview(db))
            r["scrape_s"] = median_s(lambda: scrape(db))
            r["reconcile_s"] = median_s(lambda: reconcile_pass(db, store), rounds=3)
            r["finalize_100k_s"], r["finalize_rss_mb"] = finalize_100k(db, store)
            results[size] = r
            print(f"  overview {r['overview_s'] * 1e3:.1f} ms, scrape {r['scrape_s'] * 1e3:.1f} ms, reconcile "
                  f"{r['reconcile_s'] * 1e3:.1f} ms, finalize 100k {r['finalize_100k_s']:.2f} s "
                  f"(+{r['finalize_rss_mb']:.0f} MB)", flush=True)
        gc = gc_1m(db, finished) if len(finished) * JOB_ITEMS >= 1_000_000 else None
        db.engine.dispose()
    finally:
        drop_scale_db()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return report(sizes, results, gc)


def report(sizes: list[int], results: dict[int, dict[str, Any]], gc: dict[str, float] | None) -> int:
    first, last = sizes[0], sizes[-1]
    heads = ["measure", *(f"{n / 1e6:g}M items" for n in sizes), f"{last / 1e6:g}M / {first / 1e6:g}M"]
    rows = []
    for key, label, scale, unit in (("overview_s", "aigc status overview SQL", 1e3, "ms"),
                                    ("scrape_s", "metrics scrape queries", 1e3, "ms"),
                                    ("reconcile_s", "reconciler pass", 1e3, "ms"),
                                    ("finalize_100k_s", "finalize a 100k-item job", 1, "s"),
                                    ("finalize_rss_mb", "finalize peak RSS growth", 1, "MB")):
        vals = [results[n][key] for n in sizes]
        rows.append([label, *(f"{v * scale:.1f} {unit}" for v in vals),
                     f"{vals[-1] / vals[0]:.2f}x" if vals[0] else "-"])
    gb = [(results[n]["sizes_mb"].get("items", 0) + results[n]["sizes_mb"].get("artifacts", 0)) / 1024 for n in sizes]
    rows.append(["items + artifacts tables", *(f"{g:.2f} GB" for g in gb), ""])
    text_ = table(f"Scale: {OPEN_ITEMS:,} items open at every size (PostgreSQL, synthetic rows)", heads, rows)
    targets = []
    for key, name in (("overview_s", "aigc status overview SQL"), ("scrape_s", "metrics scrape")):
        ratio = results[last][key] / results[first][key]
        targets.append({"target": f"{name} at {last:,} items within 20% of {first:,}", "holds": ratio <= 1.2,
                        "measured": round(ratio, 3)})
    targets.append({"target": "finalize of a 100k-item job: RSS growth <= 300 MB",
                    "holds": all(results[n]["finalize_rss_mb"] <= 300 for n in sizes),
                    "measured": round(max(results[n]["finalize_rss_mb"] for n in sizes), 1)})
    if gc is not None:
        table("gc of 1M finished items (a running job committing every 10 ms beside it)",
              ["items removed", "seconds", "slowest commit", "p99 commit", "commits"],
              [[f"{gc['items']:,.0f}", f"{gc['seconds']:.1f}", f"{gc['commit_max_s'] * 1e3:.0f} ms",
                f"{gc['commit_p99_s'] * 1e3:.0f} ms", gc["commits"]]])
        targets.append({"target": "gc frees 1M finished items in minutes (<= 600 s)", "holds": gc["seconds"] <= 600,
                        "measured": round(gc["seconds"], 1)})
    table("Targets", ["target", "verdict", "measured"], [[t["target"], verdict(t["holds"]), t["measured"]]
                                                          for t in targets])
    write_json("scale", {"sizes": sizes, "results": {str(k): v for k, v in results.items()}, "gc": gc,
                         "targets": targets, "table": text_})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
