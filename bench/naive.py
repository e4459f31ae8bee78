"""The naive baseline: one Celery task per item that loads the model in the task (bench/naive_tasks.py),
against the runner, on the demo-size model, through the same Redis, PostgreSQL and S3, one solo
worker each, one torch thread each, greedy with EOS off (same tokens per item). Interleaved pairs;
the speed-up is runner items/s over naive items/s.

    python -m bench.naive [--quick] [--pairs 3]
"""

from __future__ import annotations

import time
import uuid
from functools import partial
from typing import Any

from bench.common import (
    Stack,
    build_text_model,
    check_outputs,
    fmt_range,
    headline_prompts,
    interleave,
    quick_arg,
    run_job,
    summary,
    table,
    text_params,
    verdict,
    write_json,
)

NEW_TOKENS = 32


def run_naive(st, model_dir: str, prompts: list[str], timeout: float = 600) -> float:
    from sqlalchemy import create_engine, func, select

    from bench import naive_tasks

    run_id = uuid.uuid4().hex
    t0 = time.time()
    for i, p in enumerate(prompts):
        naive_tasks.app.send_task("naive.generate_one", args=[run_id, i, p, model_dir, NEW_TOKENS], queue="naive")
    eng = create_engine(st.pg_url.replace("postgresql://", "postgresql+psycopg://", 1))
    t = naive_tasks.outputs
    deadline = time.monotonic() + timeout
    try:
        while True:
            with eng.connect() as c:
                n, last = c.execute(select(func.count(), func.max(t.c.finished_at)).where(t.c.run_id == run_id)).one()
            if n >= len(prompts):
                return last - t0
            if time.monotonic() > deadline:
                raise TimeoutError(f"naive run {run_id}: {n} of {len(prompts)} after {timeout}s")
            time.sleep(0.2)  # the time comes from the rows, not from this poll
    finally:
        eng.dispose()


def naive_breakdown(st, path, prompt: str, reps: int = 5) -> dict[str, float]:
    """One naive item in this process, by step (median seconds): load tokenizer and weights, generate,
    and the whole task body called directly (load, generate, S3 put, row): no broker."""
    import os
    import statistics

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench import naive_tasks

    torch.set_num_threads(1)
    load, gen, task = [], [], []
    saved = dict(os.environ)
    os.environ.update({k: v for k, v in st.env.items() if k.startswith("AIGC_") or k.startswith("AWS_")})
    try:
        for i in range(reps):
            t0 = time.perf_counter()
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True).eval()
            t1 = time.perf_counter()
            with torch.inference_mode():
                enc = tok(prompt, return_tensors="pt")
                model.generate(**enc, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                               pad_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
            t2 = time.perf_counter()
            naive_tasks.generate_one.run("breakdown", i, prompt, str(path), NEW_TOKENS)
            load.append(t1 - t0)
            gen.append(t2 - t1)
            task.append(time.perf_counter() - t2)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return {"load_s": statistics.median(load), "generate_s": statistics.median(gen),
            "task_body_s": statistics.median(task)}


# label, (layers, width, heads), runner items, naive items
CASES = [("2L-128w (demo)", (2, 128, 4), 256, 32), ("8L-512w", (8, 512, 8), 64, 8)]


def main(argv=None) -> dict:
    p = quick_arg()
    p.add_argument("--pairs", type=int, default=None)
    args = p.parse_args(argv)
    pairs_n = args.pairs or (2 if args.quick else 3)
    cases = [(CASES[0][0], CASES[0][1], 128, 16)] if args.quick else CASES
    params = text_params(NEW_TOKENS)
    results: list[dict[str, Any]] = []
    with Stack("naive") as st:
        from sqlalchemy import create_engine

        from bench import naive_tasks

        naive_tasks.app.conf.broker_url = st.redis_url
        eng = create_engine(st.pg_url.replace("postgresql://", "postgresql+psycopg://", 1))
        naive_tasks.metadata.create_all(eng)
        eng.dispose()
        client = st.client()
        st.worker("text")
        st.celery("bench.naive_tasks", "naive")
        for label, (nl, ne, nh), n_runner, n_naive in cases:
            name = "m-" + label.split()[0]
            path = build_text_model(st.tmp / "models" / name, n_layer=nl, n_embd=ne, n_head=nh)
            client.register_model(name, "text", path.as_uri())
            prompts = headline_prompts(n_runner)
            run_job(client, name, prompts[:32], params=params)  # warm-up, not timed
            run_naive(st, str(path), prompts[:2])

            def runner(name: str = name, prompts: list[str] = prompts, n_runner: int = n_runner) -> float:
                r = run_job(client, name, prompts, params=params)
                check_outputs(client, r["job_id"], n_runner)
                return r["seconds"]

            pairs = interleave(pairs_n, runner, partial(run_naive, st, str(path), prompts[:n_naive]))
            parts = naive_breakdown(st, path, prompts[0])
            results.append({"model": label, "items_runner": n_runner, "items_naive": n_naive,
                            "pairs": [{"runner_s": a, "naive_s": b} for a, b in pairs],
                            "speedup": summary([(n_runner / a) / (n_naive / b) for a, b in pairs]),
                            "runner_items_s": summary([n_runner / a for a, _ in pairs]),
                            "naive_items_s": summary([n_naive / b for _, b in pairs]), "naive_item_breakdown": parts})
    rows, rows2 = [], []
    for r in results:
        ri, ni = r["runner_items_s"], r["naive_items_s"]
        rows += [[r["model"], "runner (chunk 32, micro-batch 16)", r["items_runner"], fmt_range(ri, 1),
                  f"{1e3 / ri['median']:.1f}", ""],
                 ["", "naive (task per item)", r["items_naive"], fmt_range(ni, 2), f"{1e3 / ni['median']:.1f}",
                  fmt_range(r["speedup"], 1)]]
        b = r["naive_item_breakdown"]
        rows2.append([r["model"], f"{b['load_s'] * 1e3:.1f}", f"{b['generate_s'] * 1e3:.1f}",
                      f"{b['task_body_s'] * 1e3:.1f}", f"{1e3 / ni['median']:.1f}"])
    text = table(f"Runner vs naive (one Celery task per item, model loaded in the task); {NEW_TOKENS} tokens greedy "
                 f"EOS off; {pairs_n} interleaved pairs, median [range]",
                 ["model", "", "items", "items/s", "ms/item", "speed-up"], rows)
    table("One naive item, ms: in this process by step (median of 5), and through Celery",
          ["model", "load (from_pretrained)", "generate (batch 1)", "task body called directly", "through Celery"],
          rows2)
    demo = results[0]["speedup"]["median"]
    ok = demo >= 20
    print(f"target >= 20x faster than the naive baseline on the demo model: {verdict(ok)} (measured {demo:.1f}x)")
    result = {"new_tokens": NEW_TOKENS, "cases": results, "table": text,
              "targets": [{"target": ">= 20x over naive (demo model)", "holds": ok, "measured": demo}]}
    write_json("naive", result)
    return result


if __name__ == "__main__":
    main()
