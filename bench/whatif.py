"""A diagnostic, not a target benchmark: how much two proposed pipeline changes would buy, emulated by
patching ``worker.pipeline`` in this process only (no product file changes), in process against the
real PostgreSQL and S3, interleaved with the bare loop.

- ``no sidecar``: the per-item provenance sidecar PUT is skipped (one PUT per item instead of two;
  the product now has this as AIGC_PROVENANCE_SIDECARS=false, measured by bench.overhead/efficiency).
- ``overlap``: micro-batch k is stored and committed in a background thread while k+1 generates
  (double buffering, at most one batch in flight; joined before the chunk finishes).

    python -m bench.whatif [--quick] [--rounds 3]
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from bench.common import (
    BareText,
    Stack,
    build_text_model,
    check_outputs,
    fmt_range,
    headline_prompts,
    one_torch_thread,
    quick_arg,
    register_null,
    summary,
    table,
    text_params,
    write_json,
)

VARIANTS = ("as is", "no sidecar", "overlap", "no sidecar + overlap")


@contextlib.contextmanager
def patched(rt, variant: str):
    import worker.pipeline as P

    saved = {"put": rt.store.put, "store": P.store_and_commit, "gen": P._generate_chunk}
    if "no sidecar" in variant:
        real_put = saved["put"]
        rt.store.put = lambda key, *a, **kw: (None if key.endswith(".provenance.json") else real_put(key, *a, **kw))
    bg = ThreadPoolExecutor(1) if "overlap" in variant else None
    if bg is not None:
        pending: list[Future[Any]] = []

        def store_later(*a, **kw):
            for f in pending:  # at most one micro-batch in flight
                f.result()
            pending.clear()
            pending.append(bg.submit(saved["store"], *a, **kw))

        def generate_chunk(*a, **kw):
            try:
                return saved["gen"](*a, **kw)
            finally:
                for f in pending:
                    f.result()
                pending.clear()

        P.store_and_commit, P._generate_chunk = store_later, generate_chunk
    try:
        yield
    finally:
        rt.store.put = saved["put"]
        P.store_and_commit, P._generate_chunk = saved["store"], saved["gen"]
        if bg is not None:
            bg.shutdown()


def main(argv=None) -> dict:
    from worker.pipeline import run_chunk
    from worker.runtime import Runtime

    p = quick_arg()
    p.add_argument("--rounds", type=int, default=None)
    args = p.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 3)
    one_torch_thread()
    cases = [("null backend", None, 512), ("2L-128w (demo)", (2, 128, 4), 256), ("8L-512w", (8, 512, 8), 64)]
    rows, out = [], []
    with Stack("whatif") as st:
        client = st.client(broker_url=None)
        # In line and with sidecars, as the product ran when this diagnostic was written: the variants
        # emulate the two changes themselves (both are settings now: AIGC_OVERLAP_STORAGE, _SIDECARS).
        rt = Runtime.from_settings(st.settings(broker_url=None, overlap_storage=False, provenance_sidecars=True))
        register_null(client, st.tmp)
        for label, shape, n in cases:
            prompts = headline_prompts(n)
            if shape:
                path = build_text_model(st.tmp / "models" / label.split()[0], n_layer=shape[0], n_embd=shape[1],
                                        n_head=shape[2])
                model = client.register_model("m-" + label.split()[0], "text", path.as_uri()).name
                bare = BareText(path)
            else:
                model, bare = "null", None
            params = text_params(32) if shape else {}

            def runner(variant, model=model, prompts=prompts, params=params, n=n):
                job = client.submit("text", model=model, items=prompts, params=params)
                with patched(rt, variant):
                    t0 = time.perf_counter()
                    for c in range((n + 31) // 32):
                        run_chunk(rt, job.id, c)
                    secs = time.perf_counter() - t0
                if "no sidecar" not in variant:
                    check_outputs(client, job.id, n, sidecars=True)
                return secs

            runner("as is")  # warm-up: the model loads and pins
            times: dict[str, list[float]] = {v: [] for v in VARIANTS}
            times["bare"] = []
            for r in range(rounds):
                order = ["bare", *VARIANTS] if r % 2 == 0 else [*reversed(VARIANTS), "bare"]
                for v in order:
                    if v == "bare":
                        if bare is not None:
                            times[v].append(bare.run(prompts, chunk_size=32, batch_size=16, new_tokens=32))
                    else:
                        times[v].append(runner(v))
            res = {"case": label, "items": n, "seconds": times}
            for v in VARIANTS:
                ms = summary([t / n * 1e3 for t in times[v]])
                e = (summary([b / a for a, b in zip(times[v], times["bare"], strict=False)])
                     if bare is not None else None)
                rows.append([label, v, fmt_range(ms, 2), fmt_range(e) if e else "-"])
                res[v] = {"ms_per_item": ms, "E_in_process": e}
            out.append(res)
    text = table(f"What-if (in process, real PostgreSQL + S3, chunk 32, micro-batch 16, {rounds} interleaved rounds; "
                 "E against the bare loop, median [range])", ["case", "variant", "ms/item", "E in process"], rows)
    write_json("whatif", {"cases": out, "table": text})
    return {"cases": out}


if __name__ == "__main__":
    main()
