"""Bulk submit: one job of 100,000 items through ``Client.submit`` into PostgreSQL and Redis, with a
warm solo worker waiting on the queue. Reports the submit's parts (validation, limits, the inserts,
the publish), rows/s into PostgreSQL, messages published and bytes per message, and the time from
submit to the first item running. The job is cancelled afterwards (its queue emptied).

    python -m bench.bulk_submit [--quick] [--items 100000] [--runs 2]
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

from bench.common import (
    REDIS_DB,
    Stack,
    build_text_model,
    headline_prompts,
    quick_arg,
    run_job,
    table,
    text_params,
    utc_seconds,
    verdict,
    write_json,
)


@contextmanager
def timed(obj, name: str, acc: dict[str, float], starts: dict[str, float] | None = None):
    """Wrap obj.name so its calls add their seconds to acc[name] (and the first call's epoch time to
    starts[name]); put back after."""
    real = getattr(obj, name)

    def wrapper(*a, **kw):
        if starts is not None:
            starts.setdefault(name, time.time())
        t0 = time.perf_counter()
        try:
            return real(*a, **kw)
        finally:
            acc[name] = acc.get(name, 0.0) + time.perf_counter() - t0

    setattr(obj, name, wrapper)
    try:
        yield
    finally:
        setattr(obj, name, real)


def queue_keys(r, queue: str = "text") -> list[bytes]:
    """kombu's Redis lists for a queue: the name itself and one per priority step."""
    return [k for k in r.keys(queue + "*") if k == queue.encode() or k.startswith(queue.encode() + b"\x06\x16")]


def one_submit(st, client, r, n: int, tag: str) -> dict:
    from sqlalchemy import func, select

    import scheduler.client as sc
    from aigc_core.schema import Chunk, ChunkStatus, Item
    from aigc_core.spec import JobSpec

    heads = headline_prompts(200)
    items = [{"custom_id": f"{tag}-{i:06d}", "prompt": heads[i % len(heads)]} for i in range(n)]
    acc: dict[str, float] = {}
    starts: dict[str, float] = {}
    with timed(sc, "parse_spec", acc), timed(sc, "check_limits", acc), timed(sc, "_write_job", acc), \
            timed(JobSpec, "payload_digest", acc), timed(client.runner, "dispatch", acc, starts):
        t0 = time.time()
        job = client.submit("text", model="tiny", items=items, params=text_params(8))
        total = time.time() - t0
    first = None
    deadline = time.monotonic() + 120
    while first is None and time.monotonic() < deadline:
        with client.db.session() as s:
            first = s.scalar(select(func.min(Item.started_at)).where(Item.job_id == job.id))
        if first is None:
            time.sleep(0.02)
    with client.db.session() as s:
        published = s.scalar(select(func.count()).select_from(Chunk)
                             .where(Chunk.job_id == job.id, Chunk.status == ChunkStatus.published))
        chunks = s.scalar(select(func.count()).select_from(Chunk).where(Chunk.job_id == job.id))
    keys = queue_keys(r)
    sizes = [len(m) for k in keys for m in r.lrange(k, 0, 49)]
    waiting = sum(r.llen(k) for k in keys)
    client.cancel(job.id)
    for k in queue_keys(r):  # the rest of the job's messages; the worker finds the job cancelled anyway
        r.delete(k)
    other = total - sum(acc.values())
    return {"items": n, "chunks": chunks, "published": published, "total_s": total, "parts_s": {**acc, "other": other},
            "rows_per_s": n / acc["_write_job"], "rows_incl_chunks_per_s": (n + chunks) / acc["_write_job"],
            "msgs_per_s": published / acc["dispatch"], "bytes_per_message": statistics.median(sizes) if sizes else None,
            "queued_after": waiting, "first_running_s": (utc_seconds(first) - t0) if first else None,
            "publish_began_s": starts["dispatch"] - t0}


def main(argv=None) -> dict:
    p = quick_arg()
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--runs", type=int, default=None)
    args = p.parse_args(argv)
    runs_n = args.runs or (1 if args.quick else 2)
    with Stack("bulk_submit") as st:
        import redis

        r = redis.Redis.from_url(st.redis_url)
        path = build_text_model(st.tmp / "models" / "tiny", n_layer=2, n_embd=64, n_head=2)
        client = st.client()
        client.register_model("tiny", "text", path.as_uri())
        st.worker("text")
        run_job(client, "tiny", headline_prompts(32), params=text_params(8))  # warm: the model is pinned
        runs = [one_submit(st, client, r, args.items, f"r{i}") for i in range(runs_n)]
    med = lambda f: statistics.median(f(x) for x in runs)  # noqa: E731
    parts = ["parse_spec", "payload_digest", "check_limits", "_write_job", "dispatch", "other"]
    labels = {"parse_spec": "validate (pydantic JobSpec)", "payload_digest": "payload digest (idempotency)",
              "check_limits": "limits check", "_write_job": "insert job, items, chunks (one transaction)",
              "dispatch": "publish chunks to Redis, mark outbox", "other": "rest (lookups, release, status)"}
    t1 = table(f"Bulk submit of {args.items:,} items (median of {runs_n} run(s); chunk 32, Redis db {REDIS_DB})",
               ["part", "seconds", "share"],
               [[labels[k], f"{med(lambda x, k=k: x['parts_s'].get(k, 0.0)):.2f}",
                 f"{med(lambda x, k=k: x['parts_s'].get(k, 0.0) / x['total_s']):.0%}"] for k in parts]
               + [["submit total", f"{med(lambda x: x['total_s']):.2f}", "100%"]])
    t2 = table("Bulk submit rates", ["what", "value"], [
        ["item rows/s into PostgreSQL (the insert transaction)", f"{med(lambda x: x['rows_per_s']):,.0f}"],
        ["rows/s incl. outbox chunk rows", f"{med(lambda x: x['rows_incl_chunks_per_s']):,.0f}"],
        ["messages published", f"{med(lambda x: x['published']):,.0f} of {med(lambda x: x['chunks']):,.0f} chunks"],
        ["messages/s (publish + outbox update)", f"{med(lambda x: x['msgs_per_s']):,.0f}"],
        ["bytes per message (Redis list entry)", f"{med(lambda x: x['bytes_per_message'] or 0):,.0f}"],
        ["submit -> first item running (warm worker)", f"{med(lambda x: x['first_running_s'] or float('nan')):.2f} s"],
        ["submit -> publish began (the insert transaction committed)", f"{med(lambda x: x['publish_began_s']):.2f} s"],
        ["publish began -> first item running (before submit returns)",
         f"{med(lambda x: (x['first_running_s'] or 0) - x['publish_began_s']):.2f} s"],
    ])
    total = med(lambda x: x["total_s"])
    ok = total <= 10 and args.items >= 100_000
    print(f"target bulk submit of 100,000 items <= 10 s: {verdict(ok)} (measured {total:.2f} s for {args.items:,})")
    result = {"runs": runs, "tables": [t1, t2],
              "targets": [{"target": "bulk submit 100k <= 10 s", "holds": ok, "measured": total}]}
    write_json("bulk_submit", result)
    return result


if __name__ == "__main__":
    main()
