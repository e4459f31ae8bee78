"""Model pinning: loads per worker process per model over jobs that alternate two models (must be 1),
on a solo worker and a prefork worker with 2 processes; then time to first output from a freshly
started worker (cold: torch import and model load included) vs the same worker's next job (warm),
in interleaved pairs.

    python -m bench.pinning [--quick] [--pairs 3]
"""

from __future__ import annotations

import statistics
import time
from collections import Counter

from bench.common import (
    Stack,
    build_text_model,
    check_outputs,
    fmt_range,
    headline_prompts,
    quick_arg,
    run_job,
    summary,
    table,
    text_params,
    utc_seconds,
    verdict,
    wait_final,
    write_json,
)

PARAMS = text_params(32)


def loads_by_worker(client, job_ids: list[str]) -> tuple[Counter, set[str]]:
    from sqlalchemy import select

    from aigc_core.schema import Item, JobEvent

    with client.db.session() as s:
        events = s.scalars(select(JobEvent).where(JobEvent.job_id.in_(job_ids), JobEvent.type == "model_loaded")).all()
        workers = set(s.scalars(select(Item.worker).where(Item.job_id.in_(job_ids)).distinct()))
    return Counter((e.data["worker"], e.data["model"]) for e in events), workers


def alternating_jobs(client, n_jobs: int, items: int) -> list[str]:
    ids = []
    for i in range(n_jobs):
        model = ("demo", "small")[i % 2]
        r = run_job(client, model, headline_prompts(items), params=PARAMS)
        check_outputs(client, r["job_id"], items)
        ids.append(r["job_id"])
    return ids


def first_output(client, model: str, n: int) -> dict:
    """Seconds from submit to the first item committed, and the model load the job recorded (if any)."""
    from sqlalchemy import func, select

    from aigc_core.schema import Item

    t0 = time.time()
    job = client.submit("text", model=model, items=headline_prompts(n), params=PARAMS)
    first = None
    while first is None:
        with client.db.session() as s:
            first = s.scalar(select(func.min(Item.finished_at)).where(Item.job_id == job.id))
        time.sleep(0.05)  # the time comes from the row, not from this poll
    ev = [e for e in client.events(job.id) if e["type"] == "model_loaded"]
    wait_final(client, job.id)
    return {"job_id": job.id, "first_output_s": utc_seconds(first) - t0,
            "model_load_s": ev[0]["seconds"] if ev else 0.0}


def import_seconds() -> float:
    """Seconds a fresh Python process takes to import the text backend (torch and transformers)."""
    import subprocess
    import sys

    code = "import time; t = time.perf_counter(); import aigc_models.text; print(time.perf_counter() - t)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                 .stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    p = quick_arg()
    p.add_argument("--pairs", type=int, default=None)
    args = p.parse_args(argv)
    pairs_n = args.pairs or (2 if args.quick else 3)
    n_jobs, items = (4, 128) if args.quick else (6, 256)
    out: dict = {"setups": []}
    with Stack("pinning") as st:
        client = st.client()
        for name, nl, ne, nh in (("demo", 2, 128, 4), ("small", 2, 64, 2)):
            path = build_text_model(st.tmp / "models" / name, n_layer=nl, n_embd=ne, n_head=nh)
            client.register_model(name, "text", path.as_uri())
        rows = []
        for label, pool, concurrency in (("solo, 1 process", "solo", 1), ("prefork, 2 processes", "prefork", 2)):
            w = st.worker("text", pool=pool, concurrency=concurrency)
            ids = alternating_jobs(client, n_jobs, items)
            loads, workers = loads_by_worker(client, ids)
            st.stop(w)
            per = {f"{wk} {m}": n for (wk, m), n in sorted(loads.items())}
            rows.append([label, n_jobs, n_jobs * items // 32, len(workers), len(loads), max(loads.values()),
                         sum(loads.values())])
            out["setups"].append({"setup": label, "jobs": n_jobs, "loads": per, "processes": sorted(workers)})
        t1 = table(f"Model loads over {n_jobs} jobs alternating two models ({items} items each, chunk 32)",
                   ["worker", "jobs", "chunks", "processes", "(process, model)", "max loads", "loads"], rows)
        cold, warm = [], []
        for _i in range(pairs_n):  # a fresh worker each pair: its first job is cold, its second warm
            w = st.worker("text")
            cold.append(first_output(client, "demo", 32))
            warm.append(first_output(client, "demo", 32))
            st.stop(w)
    imports = import_seconds()
    c = summary([x["first_output_s"] for x in cold])
    wm = summary([x["first_output_s"] for x in warm])
    ratio = summary([a["first_output_s"] / b["first_output_s"] for a, b in zip(cold, warm, strict=False)])
    load = summary([x["model_load_s"] for x in cold])
    t2 = table(f"Time to first output (submit -> first item committed), demo-size model, micro-batch 16; "
               f"{pairs_n} fresh workers, median [range]", ["", "seconds"],
               [["cold (first job of a fresh worker)", fmt_range(c, 2)],
                ["  of which the model load (job event)", fmt_range(load, 3)],
                ["    of which importing the text backend (transformers), fresh process", f"{imports:.3f}"],
                ["warm (the same worker's next job)", fmt_range(wm, 3)],
                ["cold / warm", fmt_range(ratio, 1)]])
    max_loads = max(max(s["loads"].values()) for s in out["setups"])
    ok = max_loads == 1
    print(f"target model loads per worker per model = 1: {verdict(ok)} (max measured {max_loads})")
    out.update({"import_text_backend_s": imports, "cold": cold, "warm": warm, "cold_s": c, "warm_s": wm,
                "cold_over_warm": ratio,
                "tables": [t1, t2], "targets": [{"target": "loads per worker per model = 1", "holds": ok,
                                                 "measured": max_loads}]})
    out["median_warm_first_output_s"] = statistics.median(x["first_output_s"] for x in warm)
    write_json("pinning", out)
    return out


if __name__ == "__main__":
    main()
