"""Reuse of identical work (worker/reuse.py): a 1,000-item text job, then the same job again with
``reuse: true``, as the ratio rerun / first run (target <= 0.05, issue 16), side by side in one run.

Each round submits the job with a fresh seed (so its first run truly generates) and waits for it, then
submits it again with the option on and waits; seconds run from before submit to the end of ``wait``.
The model is loaded before the first round, so the first runs do not pay for the load and the ratio
is the harder one. A reused item is a row that refers to the original's object: the rerun sends no
request to the store. Two stores: the embedded default (SQLite, a folder, the in-process worker) and a
deployment's PostgreSQL + SeaweedFS S3, each with its in-process worker and the default chunk and
micro-batch sizes and no provenance sidecars, the default (``s3-sidecars``: the same with
AIGC_PROVENANCE_SIDECARS=true, a first run that writes two objects per item). The demo-sized
text model (2 layers x 128, 4096 tokens) with the text backend's default parameters (up to 128 new
tokens, sampled under each item's seed), or ``--new-tokens N`` greedy tokens, EOS off (a cheaper
first run: a harder ratio).

    python -m bench.reuse [--quick] [--items 1000] [--rounds 3] [--stores embedded,s3,s3-sidecars]
                          [--new-tokens N]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    Stack,
    build_text_model,
    fmt_range,
    headline_prompts,
    one_torch_thread,
    quick_arg,
    summary,
    table,
    text_params,
    write_json,
)

TARGET = 0.05
PARAMS: dict[str, Any] = {}  # the backend's defaults, or text_params(--new-tokens)


def _timed_job(client, items: list[str], *, seed: int, reuse: bool) -> tuple[float, Any]:
    t0 = time.perf_counter()
    job = client.submit("text", model="bench-text", items=items, params=PARAMS, seed=seed, reuse=reuse)
    view = client.wait(job.id, timeout=1800)
    return time.perf_counter() - t0, view


def rounds(client, n: int, n_rounds: int) -> dict[str, Any]:
    """Warm the model, then ``n_rounds`` pairs (first run, rerun with reuse) of an n-item job."""
    items = headline_prompts(n)
    _timed_job(client, items[:16], seed=1, reuse=False)  # load the model into this process's worker
    firsts, reruns, ratios = [], [], []
    for r in range(n_rounds):
        seed = 1000 * (r + 1)
        first, v1 = _timed_job(client, items, seed=seed, reuse=False)
        again, v2 = _timed_job(client, items, seed=seed, reuse=True)
        if v1.counts["succeeded"] != n or v1.counts["reused"] != 0:
            raise AssertionError(f"first run: {v1.counts}")
        if v2.counts["succeeded"] != n or v2.counts["reused"] != n:
            raise AssertionError(f"rerun with reuse: {v2.counts}")
        firsts.append(first)
        reruns.append(again)
        ratios.append(again / first)
        print(f"  round {r + 1}: first {first:.2f} s, rerun {again:.3f} s, ratio {again / first:.4f}", flush=True)
    return {"first_s": summary(firsts), "rerun_s": summary(reruns), "ratio": summary(ratios)}


def embedded(tmp: Path, model: Path, n: int, n_rounds: int) -> dict[str, Any]:
    from scheduler import Client

    client = Client(database_url=f"sqlite:///{tmp}/aigc.db", storage_url=(tmp / "data").as_uri(), broker_url=None,
                    cache_dir=tmp / "cache", torch_threads=1)
    client.register_model("bench-text", "text", model.as_uri())
    return rounds(client, n, n_rounds)


def s3(model: Path, n: int, n_rounds: int, *, sidecars: bool = False) -> dict[str, Any]:
    from bench.common import BUCKET

    with Stack("reuse") as st:
        client = st.client(broker_url=None, chunk_size=32, micro_batch_size=16, provenance_sidecars=sidecars)
        uri = f"s3://{BUCKET}/models/bench-text/1/"
        c = st.s3.client() if st.s3 else None
        assert c is not None
        for p in sorted(model.rglob("*")):
            if p.is_file():
                c.upload_file(str(p), BUCKET, f"models/bench-text/1/{p.relative_to(model).as_posix()}")
        from aigc_core.registry import dir_digest

        client.register_model("bench-text", "text", uri, digest=dir_digest(model))
        return rounds(client, n, n_rounds)


def main(argv=None) -> dict:
    p = quick_arg()
    p.add_argument("--items", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=None, help="pairs per store (default 3; --quick 1)")
    p.add_argument("--stores", default="embedded,s3", help="embedded, s3, s3-sidecars (comma-separated)")
    p.add_argument("--new-tokens", type=int, default=None, help="greedy, exactly N tokens (default: the "
                   "backend's default parameters)")
    args = p.parse_args(argv)
    PARAMS.clear()
    PARAMS.update(text_params(args.new_tokens) if args.new_tokens else {})
    n_rounds = args.rounds or (1 if args.quick else 3)
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    if unknown := set(stores) - {"embedded", "s3", "s3-sidecars"}:
        p.error(f"unknown store(s) {', '.join(sorted(unknown))}: embedded, s3, s3-sidecars")
    one_torch_thread()
    res: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="aigc-bench-reuse-") as tmp:
        model = build_text_model(Path(tmp) / "model", n_layer=2, n_embd=128, n_head=2)
        for store in stores:
            print(f"{store}: {args.items} items, {n_rounds} round(s)", flush=True)
            if store == "embedded":
                (Path(tmp) / "embedded").mkdir()
                res[store] = embedded(Path(tmp) / "embedded", model, args.items, n_rounds)
            else:
                res[store] = s3(model, args.items, n_rounds, sidecars=store == "s3-sidecars")
    rows = [[store, fmt_range(r["first_s"], 2), fmt_range(r["rerun_s"], 3), fmt_range(r["ratio"], 4)]
            for store, r in res.items()]
    gen = f"{args.new_tokens} greedy tokens" if args.new_tokens else "default parameters"
    t = table(f"Reuse: a {args.items}-item text job ({gen}), then again with reuse: true ({n_rounds} round(s), "
              "median [range])", ["store", "first run s", "rerun s", "rerun / first"], rows)
    targets = [{"target": f"rerun with reuse <= {TARGET} x first run ({store})",
                "holds": r["ratio"]["median"] <= TARGET, "measured": r["ratio"]["median"]} for store, r in res.items()]
    result = {"items": args.items, "rounds": n_rounds, "params": dict(PARAMS), "stores": res, "tables": [t],
              "targets": targets}
    write_json("reuse", result)
    return result


if __name__ == "__main__":
    main()
