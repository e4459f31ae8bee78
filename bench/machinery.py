"""The runner's machinery per item on the null backend (fixed bytes, no model): storing overlapped with
generating or in line, provenance sidecars on or off, side by side in one run.

End to end through real PostgreSQL, Redis, S3 (SeaweedFS) and solo Celery workers, one per variant on a
queue of its own (``AIGC_OVERLAP_STORAGE``, ``AIGC_PROVENANCE_SIDECARS``), chunk 32, micro-batch 16,
rounds interleaved (order rotated). Per item: end to end (submit -> outputs in S3, rows committed, the
job final) and the worker's task time (Celery logs each task's run time). Then, in process against the
same servers, what each item costs in round trips (SQL statements and transactions, S3 PUTs) and how
many bytes of provenance JSON its Artifact row holds, and how many of them repeat the job's.

    python -m bench.machinery [--quick] [--rounds 3] [--items 512]
"""

from __future__ import annotations

import json
import statistics
from functools import partial
from unittest.mock import patch

from bench.common import (
    SqlCounter,
    Stack,
    check_outputs,
    fmt_range,
    headline_prompts,
    interleave_many,
    quick_arg,
    register_null,
    run_job,
    summary,
    table,
    task_seconds,
    verdict,
    write_json,
)

VARIANTS = {  # name: (overlap, sidecars)
    "overlap, no sidecars": (True, False),
    "in line, no sidecars": (False, False),
    "overlap, sidecars": (True, True),
    "in line, sidecars": (False, True),
}
CHUNK = 32
# Provenance entries that are the same for every item a worker process makes for a job (params are
# not: an item may set its own).
JOB_LEVEL = ("job_id", "model", "worker", "device", "versions")


def env_of(overlap: bool, sidecars: bool) -> dict[str, str]:
    return {"AIGC_OVERLAP_STORAGE": str(overlap).lower(), "AIGC_PROVENANCE_SIDECARS": str(sidecars).lower()}


def round_trips(st, n: int, overlap: bool, sidecars: bool) -> dict:
    """In process, no broker: statements, transactions and PUTs per item of ``run_chunk`` over a job."""
    from worker.pipeline import run_chunk
    from worker.runtime import Runtime

    client = st.client(broker_url=None)
    rt = Runtime.from_settings(st.settings(broker_url=None, overlap_storage=overlap, provenance_sidecars=sidecars))
    warm = client.submit("text", model="null", items=headline_prompts(CHUNK), chunk_size=CHUNK)
    run_chunk(rt, warm.id, 0)
    job = client.submit("text", model="null", items=headline_prompts(n), chunk_size=CHUNK)
    counter, puts = SqlCounter(rt.db.engine), {"n": 0}
    real_put = rt.store.put

    def counting_put(*a, **kw):
        puts["n"] += 1
        return real_put(*a, **kw)

    try:
        with patch.object(rt.store, "put", counting_put):
            for c in range((n + CHUNK - 1) // CHUNK):
                run_chunk(rt, job.id, c)
    finally:
        counter.close()
    check_outputs(client, job.id, n, sidecars=sidecars)
    provs = [r.provenance for r in client.results(job.id)]
    size = statistics.median(len(json.dumps(p)) for p in provs)
    shared = statistics.median(len(json.dumps({k: p[k] for k in JOB_LEVEL if k in p})) for p in provs)
    return {"sql_statements_per_item": counter.statements / n, "sql_transactions_per_item": counter.commits / n,
            "s3_puts_per_item": puts["n"] / n, "provenance_bytes_per_item": size,
            "job_level_provenance_bytes_per_item": shared}


def main(argv=None) -> dict:
    p = quick_arg()
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--items", type=int, default=None, help="items per job (default 512, 256 with --quick)")
    args = p.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 3)
    n = args.items or (256 if args.quick else 512)
    with Stack("machinery", chunk_size=CHUNK, micro_batch_size=16) as st:
        client = st.client()
        workers = {}
        for i, (v, (overlap, sidecars)) in enumerate(VARIANTS.items()):
            register_null(client, st.tmp, f"null-{i}", queue=f"null-{i}")
            workers[v] = st.worker(f"null-{i}", env=env_of(overlap, sidecars))
            run_job(client, f"null-{i}", headline_prompts(CHUNK), chunk_size=CHUNK)  # warm-up
        register_null(client, st.tmp)  # "null", for the in-process counts
        task_ms: dict[str, list[float]] = {v: [] for v in VARIANTS}

        def one(i: int, v: str) -> float:
            r = run_job(client, f"null-{i}", headline_prompts(n), chunk_size=CHUNK, timeout=120)
            check_outputs(client, r["job_id"], n, sidecars=VARIANTS[v][1])
            tasks, secs = task_seconds(workers[v].log(), r["job_id"])
            if tasks != (n + CHUNK - 1) // CHUNK:
                raise RuntimeError(f"found {tasks} task run times in the worker log, want {(n + CHUNK - 1) // CHUNK}")
            task_ms[v].append(secs / n * 1e3)
            return r["seconds"] / n * 1e3

        runs = interleave_many(rounds, {v: partial(one, i, v) for i, v in enumerate(VARIANTS)})
        trips = {v: round_trips(st, n, *VARIANTS[v]) for v in VARIANTS}
    rows = [[v, fmt_range(summary(runs[v]), 2), fmt_range(summary(task_ms[v]), 2),
             f"{trips[v]['sql_statements_per_item']:.2f}", f"{trips[v]['sql_transactions_per_item']:.3f}",
             f"{trips[v]['s3_puts_per_item']:.2f}"] for v in VARIANTS]
    text = table(f"Machinery per item, null backend, chunk {CHUNK}, micro-batch 16, {n} items a job, {rounds} "
                 "interleaved rounds, median [range]", ["variant", "end to end ms/item", "worker task ms/item",
                                                        "SQL statements", "SQL transactions", "S3 PUTs"], rows)
    t = trips["overlap, no sidecars"]
    prov = table("Provenance JSON in each Artifact row (median bytes per item)", ["what", "bytes"],
                 [["whole provenance", f"{t['provenance_bytes_per_item']:.0f}"],
                  [f"of which the same for a job's items on one worker ({', '.join(JOB_LEVEL)})",
                   f"{t['job_level_provenance_bytes_per_item']:.0f}"]])
    m = statistics.median(runs["overlap, no sidecars"])
    print(f"target machinery <= 1.0 ms/item on the null backend (defaults: overlap, no sidecars): "
          f"{verdict(m <= 1.0)} (measured {m:.2f} ms/item end to end)")
    result = {"items": n, "rounds": rounds, "chunk": CHUNK, "ms_per_item": runs, "task_ms_per_item": task_ms,
              "round_trips": trips, "tables": [text, prov],
              "targets": [{"target": "machinery <= 1.0 ms/item, null backend, chunk 32 (overlap, no sidecars)",
                           "holds": m <= 1.0, "measured": m}]}
    write_json("machinery", result)
    return result


if __name__ == "__main__":
    main()
