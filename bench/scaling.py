"""Scaling: 1 vs 2 solo worker processes on this 2-core machine, and a paper estimate of what Redis and
PostgreSQL must carry for 100 GPU workers against what they sustain here.

Both workers stay up and warm: the model is registered twice, on queue ``one`` (worker A only) and
queue ``two`` (workers A and B), so a job runs on 1 or 2 processes with nothing restarted between
the interleaved pairs. The per-item and per-chunk load on the database and the broker is measured:
SQL statements and commits per item (an in-process run with SQLAlchemy events), Redis commands per
chunk (MONITOR on our Redis database during a job). Capacity here: ``redis-benchmark`` and
``pgbench`` when installed (else short Python loops), and the bulk insert rate.

    python -m bench.scaling [--quick] [--pairs 3]
"""

from __future__ import annotations

import re
import shutil
import statistics
import subprocess
import time

from bench.common import (
    REDIS_DB,
    RedisMonitor,
    SqlCounter,
    Stack,
    build_text_model,
    check_outputs,
    fmt_range,
    headline_prompts,
    interleave,
    quick_arg,
    register_null,
    run_job,
    summary,
    table,
    text_params,
    write_json,
)

PARAMS = text_params(32)


def scaling_pairs(client, model_one: str, model_two: str, n: int, pairs_n: int, params: dict) -> list:
    prompts = headline_prompts(n)

    def job(model):
        def run():
            r = run_job(client, model, prompts, params=params)
            check_outputs(client, r["job_id"], n)
            return r["seconds"]
        return run

    return interleave(pairs_n, job(model_one), job(model_two))


def per_item_load(st, client, n: int = 256) -> dict:
    """SQL statements/commits per item (in process) and Redis commands per chunk (through the worker)."""
    from worker.pipeline import run_chunk
    from worker.runtime import Runtime

    emb = st.client(broker_url=None)
    rt = Runtime.from_settings(st.settings(broker_url=None))
    job = emb.submit("text", model="null", items=headline_prompts(n), chunk_size=32)
    counter = SqlCounter(rt.db.engine)
    for c in range(n // 32):
        run_chunk(rt, job.id, c)
    counter.close()
    mon = RedisMonitor(st.redis_url)
    r = run_job(client, "null-two", headline_prompts(n), chunk_size=32)
    time.sleep(0.3)
    cmds = mon.close()
    chunks = n // 32
    return {"sql_statements_per_item": counter.statements / n, "sql_commits_per_item": counter.commits / n,
            "sql_rows_per_item": counter.params / n, "redis_commands": cmds,
            "redis_commands_per_chunk": sum(cmds.values()) / chunks, "job": r["job_id"]}


def redis_capacity(url: str) -> dict:
    """Messages/s Redis takes here: LPUSH and RPOP with 10 clients, no pipelining (redis-benchmark)."""
    exe = shutil.which("redis-benchmark")
    m = re.match(r"redis://([^:/]+):?(\d*)", url)
    if m is None:  # AIGC_BENCH_REDIS_URL may name another scheme (rediss://, unix://)
        raise ValueError(f"redis-benchmark needs a redis://host:port URL, not {url!r}")
    host, port = m.groups()
    if exe:
        out = subprocess.run([exe, "-h", host, "-p", port or "6379", "--dbnum", str(REDIS_DB), "-n", "20000",
                              "-c", "10", "-t", "lpush,rpop", "--csv", "-q"], capture_output=True, text=True,
                             timeout=120).stdout
        rates = {}
        for line in out.splitlines():
            parts = [x.strip('"') for x in line.split(",")]
            if len(parts) >= 2 and parts[0] in ("LPUSH", "RPOP"):
                rates[parts[0].lower() + "_per_s"] = float(parts[1])
        if rates:
            return {"tool": "redis-benchmark -c 10 -n 20000", **rates}
    import redis

    r = redis.Redis.from_url(url)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 1.0:
        r.lpush("bench:cap", b"x" * 1000)
        r.rpop("bench:cap")
        n += 2
    return {"tool": "redis-py loop, 1 client", "lpush_per_s": n / 2 / (time.perf_counter() - t0),
            "rpop_per_s": n / 2 / (time.perf_counter() - t0)}


def pg_capacity(pg_url: str, tmp) -> dict:
    """Single-row UPDATE transactions/s (synchronous commit) with 4 clients for 5 s (pgbench)."""
    exe = shutil.which("pgbench")
    from sqlalchemy import create_engine, text

    eng = create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://", 1))
    with eng.begin() as c:
        c.execute(text("CREATE TABLE bench_rows (id int PRIMARY KEY, v bigint NOT NULL DEFAULT 0)"))
        c.execute(text("INSERT INTO bench_rows (id) SELECT generate_series(1, 10000)"))
    try:
        if exe:
            script = tmp / "update.sql"
            script.write_text("\\set id random(1, 10000)\nUPDATE bench_rows SET v = v + 1 WHERE id = :id;\n")
            out = subprocess.run([exe, "-n", "-c", "4", "-j", "2", "-T", "5", "-f", str(script), pg_url],
                                 capture_output=True, text=True, timeout=120).stdout
            m = re.search(r"tps = ([0-9.]+)", out)
            if m:
                return {"tool": "pgbench -c 4 -j 2 -T 5, single-row UPDATE", "tx_per_s": float(m.group(1))}
        t0, n = time.perf_counter(), 0
        with eng.connect() as c:
            while time.perf_counter() - t0 < 2.0:
                c.execute(text("UPDATE bench_rows SET v = v + 1 WHERE id = :i"), {"i": n % 10000 + 1})
                c.commit()
                n += 1
        return {"tool": "SQLAlchemy loop, 1 client", "tx_per_s": n / (time.perf_counter() - t0)}
    finally:
        with eng.begin() as c:
            c.execute(text("DROP TABLE bench_rows"))
        eng.dispose()


def s3_capacity(st, seconds: float = 2.0) -> dict:
    """1 KiB PUTs/s into this machine's SeaweedFS with 8 client threads (the pipeline's upload pool)."""
    from concurrent.futures import ThreadPoolExecutor

    from aigc_core.storage import open_store

    store = open_store(st.env["AIGC_STORAGE_URL"], st.env["AIGC_S3_ENDPOINT_URL"])
    data = b"x" * 1024
    t0, done = time.perf_counter(), 0
    with ThreadPoolExecutor(8) as ex:
        while time.perf_counter() - t0 < seconds:
            list(ex.map(lambda i, base=done: store.put(f"cap/{base + i}.bin", data), range(64)))
            done += 64
    return {"tool": "S3Store.put 1 KiB, 8 threads", "put_per_s": done / (time.perf_counter() - t0)}


def paper(load: dict, redis_cap: dict, pg_cap: dict, s3_cap: dict, rows_per_s: float | None,
          chunk: int = 32) -> tuple[list, list]:
    """What 100 GPU workers need at a few per-worker rates, against what this machine's servers sustain."""
    workers = 100
    rows = []
    redis_rate = min(redis_cap.get("lpush_per_s", 0), redis_cap.get("rpop_per_s", 0)) or float("nan")
    for per_worker in (1, 10, 100):
        items = workers * per_worker
        msgs = items / chunk
        cmds = msgs * load["redis_commands_per_chunk"]
        tx = items * load["sql_commits_per_item"]
        rows.append([f"{per_worker} items/s per GPU", f"{items:,}", f"{msgs:,.0f}", f"{cmds:,.0f}",
                     f"{cmds / redis_rate:.1%}", f"{tx:,.0f}", f"{tx / pg_cap['tx_per_s']:.0%}",
                     f"{items * load['sql_statements_per_item']:,.0f}", f"{items * load['sql_rows_per_item']:,.0f}",
                     f"{items:,}", f"{items / s3_cap['put_per_s']:.0%}"])
    cap = [["SeaweedFS 1 KiB PUT/s, 8 threads (S3)", f"{s3_cap['put_per_s']:,.0f}"],
           ["Redis LPUSH/s (redis-benchmark or loop)", f"{redis_cap.get('lpush_per_s', 0):,.0f}"],
           ["Redis RPOP/s", f"{redis_cap.get('rpop_per_s', 0):,.0f}"],
           ["PostgreSQL single-row UPDATE tx/s (sync commit)", f"{pg_cap['tx_per_s']:,.0f}"]]
    if rows_per_s:
        cap.append(["PostgreSQL bulk insert rows/s (one submit)", f"{rows_per_s:,.0f}"])
    return rows, cap


def main(argv=None) -> dict:
    p = quick_arg()
    p.add_argument("--pairs", type=int, default=None)
    args = p.parse_args(argv)
    pairs_n = args.pairs or (2 if args.quick else 3)
    n = 256 if args.quick else 384
    with Stack("scaling") as st:
        client = st.client()
        path = build_text_model(st.tmp / "models" / "demo", n_layer=2, n_embd=128, n_head=4)
        client.register_model("demo-one", "text", path.as_uri(), queue="one")
        client.register_model("demo-two", "text", path.as_uri(), queue="two")
        register_null(client, st.tmp, "null")
        register_null(client, st.tmp, "null-one", queue="one")
        register_null(client, st.tmp, "null-two", queue="two")
        st.worker("one,two")
        st.worker("two")
        for m in ("demo-two", "demo-two", "null-two", "null-two"):  # both workers load and pin both models
            run_job(client, m, headline_prompts(64), params=PARAMS if m.startswith("demo") else {})
        demo = scaling_pairs(client, "demo-one", "demo-two", n, pairs_n, PARAMS)
        null = [] if args.quick else scaling_pairs(client, "null-one", "null-two", 1024, pairs_n, {})
        load = per_item_load(st, client)
        redis_cap = redis_capacity(st.redis_url)
        pg_cap = pg_capacity(st.pg_url, st.tmp)
        s3_cap = s3_capacity(st)
    rows = []
    res = {}
    for label, pairs, items in (("demo-size model", demo, n), ("null backend", null, 1024)):
        if not pairs:
            continue
        one = summary([items / a for a, _ in pairs])
        two = summary([items / b for _, b in pairs])
        sp = summary([a / b for a, b in pairs])
        res[label] = {"pairs": pairs, "one_items_s": one, "two_items_s": two, "speedup": sp}
        rows.append([label, items, fmt_range(one, 1), fmt_range(two, 1), fmt_range(sp, 2)])
    t1 = table(f"1 vs 2 solo worker processes on {__import__('os').cpu_count()} cores ({pairs_n} interleaved "
               "pairs, median [range])", ["", "items", "1 process items/s", "2 processes items/s", "speed-up"], rows)
    bulk = None
    try:
        import json

        from bench.common import RESULTS

        runs = json.loads((RESULTS / "bulk_submit.json").read_text())["runs"]
        bulk = statistics.median(r["rows_per_s"] for r in runs)
    except (OSError, KeyError, ValueError):
        pass
    need, cap = paper(load, redis_cap, pg_cap, s3_cap, bulk)
    t2 = table("Measured load per unit (chunk 32, micro-batch 16)", ["what", "value"], [
        ["SQL transactions per item (worker)", f"{load['sql_commits_per_item']:.3f}"],
        ["SQL statements per item (worker)", f"{load['sql_statements_per_item']:.3f}"],
        ["SQL parameter rows per item (worker)", f"{load['sql_rows_per_item']:.2f}"],
        ["Redis commands per chunk (publish, deliver, ack, events)", f"{load['redis_commands_per_chunk']:.1f}"],
        ["S3 PUTs per item (output; 2 with AIGC_PROVENANCE_SIDECARS=true)", "1"]])
    t3 = table("Paper estimate: 100 GPU workers, chunk 32", ["per-GPU rate", "items/s", "messages/s", "Redis cmds/s",
                                                               "of Redis here", "SQL tx/s", "of PG here",
                                                               "SQL stmts/s", "SQL rows/s", "S3 PUT/s",
                                                               "of S3 here"], need)
    t4 = table("What Redis and PostgreSQL sustain on this 2-core machine (shared with the benchmark's own load)",
               ["server", "per second"], cap)
    out = {"items": n, "results": res, "load": load, "redis_capacity": redis_cap, "pg_capacity": pg_cap,
           "s3_capacity": s3_cap,
           "bulk_rows_per_s": bulk, "tables": [t1, t2, t3, t4]}
    write_json("scaling", out)
    return out


if __name__ == "__main__":
    main()
