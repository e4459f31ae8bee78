"""Overhead per item with the null backend (fixed bytes, no model): the runner's machinery alone.

End to end through real PostgreSQL, Redis, S3 (SeaweedFS) and a solo Celery worker, for chunk sizes
1, 8, 32 and 128 (micro-batches of 16), with provenance sidecars on (two PUTs per item)
and off (one PUT, the default; a second worker on its own queue), in interleaved
rounds; ratios are against chunk 32.
Then where the time goes at chunk 32: cProfile around an in-process ``run_chunk`` against the same
PostgreSQL and S3 (db / s3 / generate / other), the statements and commits per item, and the broker
share (end to end minus submit minus the in-process run).

    python -m bench.overhead [--quick] [--rounds 3] [--sidecars on|off|both]
"""

from __future__ import annotations

import statistics
import time
from unittest.mock import patch

from bench.common import (
    NO_SIDECARS,
    SIDECARS,
    SqlCounter,
    Stack,
    check_outputs,
    fmt_range,
    headline_prompts,
    quick_arg,
    register_null,
    run_job,
    summary,
    table,
    task_seconds,
    verdict,
    write_json,
)
from bench.profiling import profile_chunks, top

CHUNKS = (1, 8, 32, 128)
ITEMS = {1: 96, 8: 256, 32: 512, 128: 512}  # a few seconds each on a quiet 2-core machine


VARIANTS = {"on": SIDECARS, "off": NO_SIDECARS}  # AIGC_PROVENANCE_SIDECARS: two PUTs per item, or one


def end_to_end(st, rounds: int, items: dict[int, int], variants: list[str]) -> dict[tuple[int, str], list[dict]]:
    """Every chunk size on a worker per sidecar setting (queue ``text-on`` / ``text-off``), interleaved."""
    client = st.client()
    workers = {}
    for v in variants:
        register_null(client, st.tmp, f"null-{v}", queue=f"text-{v}")
        workers[v] = st.worker(f"text-{v}", env=VARIANTS[v])
        run_job(client, f"null-{v}", headline_prompts(32), chunk_size=32)  # warm-up: imports, connections
    runs: dict[tuple[int, str], list[dict]] = {(c, v): [] for c in CHUNKS for v in variants}
    cases = [(c, v) for c in CHUNKS for v in variants]
    for r in range(rounds):
        for cs, v in (cases if r % 2 == 0 else cases[::-1]):  # interleaved, alternating order
            n = items[cs]
            res = run_job(client, f"null-{v}", headline_prompts(n), chunk_size=cs)
            check_outputs(client, res["job_id"], n, sidecars=v == "on")
            res["tasks"], res["task_s"] = task_seconds(workers[v].log(), res["job_id"])
            if res["tasks"] != (n + cs - 1) // cs:
                raise RuntimeError(f"found {res['tasks']} task run times in the worker log, want {(n + cs - 1) // cs}")
            runs[(cs, v)].append(res)
    return runs


def where_time_goes(st, n: int, sidecars: bool, chunk: int = 32) -> dict:
    """In process, no broker: the same pipeline code the Celery task calls, under cProfile."""
    from worker.pipeline import run_chunk
    from worker.runtime import Runtime

    client = st.client(broker_url=None)  # submits into the outbox; nothing is published
    model = "null-on" if sidecars else "null-off"
    # Storing in line: cProfile sees only this thread, and an overlapped store would show as a wait.
    rt = Runtime.from_settings(st.settings(broker_url=None, provenance_sidecars=sidecars, overlap_storage=False))
    chunks = list(range((n + chunk - 1) // chunk))
    warm = client.submit("text", model=model, items=headline_prompts(chunk), chunk_size=chunk)
    profile_chunks(rt, warm.id, [0])
    plain = []
    for _ in range(2):  # without the profiler
        job = client.submit("text", model=model, items=headline_prompts(n), chunk_size=chunk)
        t0 = time.perf_counter()
        for c in chunks:
            run_chunk(rt, job.id, c)
        plain.append(time.perf_counter() - t0)
        check_outputs(client, job.id, n, sidecars=sidecars)
    job = client.submit("text", model=model, items=headline_prompts(n), chunk_size=chunk)
    counter = SqlCounter(rt.db.engine)
    puts = {"n": 0}
    real_put = rt.store.put

    def counting_put(*a, **kw):
        puts["n"] += 1
        return real_put(*a, **kw)

    with patch.object(rt.store, "put", counting_put):
        try:
            prof = profile_chunks(rt, job.id, chunks)
        finally:
            counter.close()
    check_outputs(client, job.id, n, sidecars=sidecars)
    return {"items": n, "chunk": chunk, "sidecars": sidecars, "plain_wall_s": plain, "profiled_wall_s": prof["wall_s"],
            "categories_s": prof["categories"], "steps": prof["steps"], "top_self_time": top(prof["stats"], 20),
            "sql_statements_per_item": counter.statements / n, "sql_commits_per_item": counter.commits / n,
            "sql_rows_sent_per_item": counter.params / n, "s3_puts_per_item": puts["n"] / n}


def breakdown(runs: list[dict], prof: dict) -> dict[str, float]:
    """Per item at one chunk size: submit and the worker's task time from the end-to-end runs (Celery
    logs each task's run time), the task time split by the in-process profile's category shares."""
    e2e = statistics.median(r["seconds"] / r["items"] for r in runs) * 1e3
    sub = statistics.median(r["submit_s"] / r["items"] for r in runs) * 1e3
    task = statistics.median(r["task_s"] / r["items"] for r in runs) * 1e3
    total = sum(prof["categories_s"].values())
    cats = {k: prof["categories_s"].get(k, 0.0) / total * task for k in ("db", "s3", "generate", "other")}
    return {"submit": sub, "worker_task": task, **cats, "broker_rest": e2e - sub - task, "end_to_end": e2e}


def main(argv=None) -> dict:
    p = quick_arg()
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--sidecars", choices=("on", "off", "both"), default="both",
                   help="provenance sidecars (both: two workers, side by side)")
    args = p.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 3)
    variants = list(VARIANTS) if args.sidecars == "both" else [args.sidecars]
    items = {c: (n // 2 if args.quick else n) for c, n in ITEMS.items()}
    with Stack("overhead") as st:
        runs = end_to_end(st, rounds, items, variants)
        profs = {v: where_time_goes(st, 256 if args.quick else 512, v == "on") for v in variants}

    ms = {k: [r["seconds"] / r["items"] * 1e3 for r in rs] for k, rs in runs.items()}
    ref = statistics.median(ms[(32, variants[0])])
    rows = []
    for c in CHUNKS:
        row: list[object] = [c, items[c]]
        for v in variants:
            s = summary(ms[(c, v)])
            row += [fmt_range(s, 2), f"{1e3 / s['median']:.0f}"]
        row += [f"{statistics.median(r['submit_s'] / r['items'] * 1e3 for r in runs[(c, variants[0])]):.2f}",
                f"{statistics.median(ms[(c, variants[0])]) / ref:.2f}"]
        rows.append(row)
    heads = ["chunk", "items"]
    for v in variants:
        heads += [f"ms/item (sidecars {v})", f"items/s ({v})"]
    heads += ["submit ms/item", f"vs chunk 32 ({variants[0]})"]
    t1 = table(f"Null backend, end to end (submit -> outputs in S3, rows committed, job final); micro-batch 16; "
               f"{rounds} interleaved rounds, median [range]; sidecars on = two PUTs per item, off = one (the default)",
               heads, rows)

    bd = {v: breakdown(runs[(32, v)], profs[v]) for v in variants}
    labels = [("submit", "submit: validate, insert, publish (client)"),
              ("worker_task", "worker task (run_chunk in Celery), of which:"), ("db", "  db"), ("s3", "  s3"),
              ("generate", "  generate"), ("other", "  other"),
              ("broker_rest", "broker and Celery between tasks, finalize"), ("end_to_end", "end to end")]
    rows2 = []
    for key, label in labels:
        row = [label]
        for v in variants:
            row += [f"{bd[v][key]:.3f}", f"{bd[v][key] / bd[v]['end_to_end']:.0%}"]
        rows2.append(row)
    heads2 = ["part"]
    for v in variants:
        heads2 += [f"ms/item ({v})", "share"]
    t2 = table("Where the time goes at chunk 32, null backend (the worker's task time split by a cProfile of "
               "in-process run_chunk on the same PostgreSQL and S3)", heads2, rows2)
    prof = profs[variants[0]]
    n = prof["items"]
    steps = sorted(prof["steps"].items(), key=lambda kv: -kv[1]["seconds"])
    t3 = table(f"Pipeline steps (cumulative, profiled, sidecars {variants[0]}; they nest)",
               ["step", "calls", "ms/item"],
               [[k, v["calls"], f"{v['seconds'] / n * 1e3:.3f}"] for k, v in steps])
    t4 = table("Per item at chunk 32, micro-batch 16 (in process)", ["what", *[f"sidecars {v}" for v in variants]],
               [["SQL statements", *[f"{profs[v]['sql_statements_per_item']:.2f}" for v in variants]],
                ["SQL commits (transactions)", *[f"{profs[v]['sql_commits_per_item']:.3f}" for v in variants]],
                ["SQL parameter rows sent", *[f"{profs[v]['sql_rows_sent_per_item']:.2f}" for v in variants]],
                ["S3 PUTs", *[f"{profs[v]['s3_puts_per_item']:.2f}" for v in variants]]])
    table(f"Top self time in the profiled run (s, sidecars {variants[0]})", ["function", "calls", "self s", "cum s"],
          [[f, c, f"{a:.3f}", f"{b:.3f}"] for f, c, a, b in prof["top_self_time"][:12]])
    targets = []
    for v in variants:
        m = statistics.median(ms[(32, v)])
        targets.append({"target": f"null overhead <= 2 ms/item at chunk 32 (sidecars {v})", "holds": m <= 2.0,
                        "measured": m})
        print(f"target null-backend overhead <= 2 ms/item at chunk 32 (sidecars {v}): {verdict(m <= 2.0)} "
              f"(measured {m:.2f} ms/item)")
    result = {"rounds": rounds, "items": items, "sidecars": variants,
              "runs": {f"chunk{c}-sidecars-{v}": rs for (c, v), rs in runs.items()},
              "ms_per_item": {f"chunk{c}-sidecars-{v}": summary(m) for (c, v), m in ms.items()},
              "profiles": profs, "breakdown_ms_per_item": bd, "tables": [t1, t2, t3, t4], "targets": targets}
    write_json("overhead", result)
    return result


if __name__ == "__main__":
    main()
