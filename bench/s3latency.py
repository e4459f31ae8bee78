"""E with S3 latency: the runner against a bare ``generate`` loop when each S3 request takes 20 or 50 ms
longer, as from a cloud GPU host, with storing overlapped with generating (the default) and in line.

Workers reach SeaweedFS through a TCP proxy that holds each request for the delay
(bench/latency_proxy.py): one solo Celery worker per (delay, overlap) on a queue of its own,
``AIGC_OVERLAP_STORAGE=true|false``, the other settings the product's defaults. End to end is submit ->
every output in S3, its row committed, the job final (manifest written through the proxy too), as in
``bench.efficiency``; the bare loop runs in this process on the same checkpoint, prompts,
micro-batches and greedy decoding with EOS off. E per round = bare seconds / runner seconds, the
variants interleaved with the bare loop (order rotated each round).

    python -m bench.s3latency [--quick] [--delays 0,20,50] [--pairs 3] [--chunk 32] [--batch 16]
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from urllib.parse import urlsplit

from bench.common import (
    BareText,
    Stack,
    build_text_model,
    check_outputs,
    fmt_range,
    headline_prompts,
    interleave_many,
    one_torch_thread,
    quick_arg,
    run_job,
    summary,
    table,
    text_params,
    verdict,
    write_json,
)
from bench.latency_proxy import LatencyProxy

# label, layers, width, heads, items per run (a multiple of the chunk size; a few seconds each)
SIZES = [("2L-128w (demo, 0.8M)", 2, 128, 4, 512), ("4L-256w (4M)", 4, 256, 4, 512)]  # the 512 prompts
OVERLAP = ("on", "off")
TARGET_SIZE, TARGET_DELAY = "4L-256w (4M)", 20


def variant(delay_ms: int, overlap: str) -> str:
    return f"{delay_ms}ms-{overlap}"


def main(argv=None) -> dict:
    p = quick_arg()
    p.add_argument("--delays", default="0,20,50", help="added ms per S3 request, comma-separated (0: no proxy)")
    p.add_argument("--pairs", type=int, default=None, help="interleaved rounds per size")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=16, help="micro-batch size (AIGC_MICRO_BATCH_SIZE)")
    p.add_argument("--chunk", type=int, default=32, help="chunk size (AIGC_CHUNK_SIZE)")
    args = p.parse_args(argv)
    rounds = args.pairs or (2 if args.quick else 3)
    delays = [int(d) for d in args.delays.split(",")]
    variants = [variant(d, o) for d in delays for o in OVERLAP]
    params = text_params(args.new_tokens)
    one_torch_thread()
    out, proxies = [], {}
    with Stack("s3latency", chunk_size=args.chunk, micro_batch_size=args.batch) as st:
        try:
            assert st.s3 is not None
            u = urlsplit(st.s3.endpoint)
            proxies = {d: LatencyProxy((u.hostname or "127.0.0.1", u.port or 80), d / 1000) for d in delays if d}
            client = st.client()
            paths = {}
            for label, nl, ne, nh, _ in SIZES:
                paths[label] = build_text_model(st.tmp / "models" / label.split()[0], n_layer=nl, n_embd=ne,
                                                n_head=nh)
                for v in variants:  # one registration per worker queue
                    client.register_model(f"lat-{label.split()[0]}-{v}", "text", paths[label].as_uri(),
                                          queue=f"text-{v}")
            for d in delays:
                for o in OVERLAP:
                    env = {"AIGC_OVERLAP_STORAGE": "true" if o == "on" else "false"}
                    if d:
                        env["AIGC_S3_ENDPOINT_URL"] = proxies[d].url
                    st.worker(f"text-{variant(d, o)}", env=env)
            for label, _nl, _ne, _nh, n in SIZES:
                prompts = headline_prompts(n)
                bare = BareText(paths[label])
                for v in variants:  # warm-up, not timed: each worker loads and pins the model
                    run_job(client, f"lat-{label.split()[0]}-{v}", prompts[: args.chunk], params=params)
                bare.run(prompts[: args.batch], chunk_size=args.chunk, batch_size=args.batch,
                         new_tokens=args.new_tokens)

                def runner(v: str, label: str = label, prompts: list[str] = prompts, n: int = n) -> float:
                    r = run_job(client, f"lat-{label.split()[0]}-{v}", prompts, params=params, timeout=300)
                    check_outputs(client, r["job_id"], n)  # after the clock; the default sidecar setting
                    return r["seconds"]

                fns: dict[str, Callable[[], float]] = {v: partial(runner, v) for v in variants}
                fns["bare"] = partial(bare.run, prompts, chunk_size=args.chunk, batch_size=args.batch,
                                      new_tokens=args.new_tokens)
                runs = interleave_many(rounds, fns)
                res = {"model": label, "items": n, "parameters": sum(q.numel() for q in bare.model.parameters()),
                       "seconds": runs, "bare_items_s": summary([n / t for t in runs["bare"]])}
                for v in variants:
                    res[v] = {"E": summary([b / a for a, b in zip(runs[v], runs["bare"], strict=False)]),
                              "runner_items_s": summary([n / a for a in runs[v]])}
                out.append(res)
        finally:
            for px in proxies.values():
                px.close()
    rows = []
    for r in out:
        for d in delays:
            on, off = r[variant(d, "on")], r[variant(d, "off")]
            rows.append([r["model"], f"{r['parameters'] / 1e6:.2f}M", r["items"], f"+{d} ms" if d else "none",
                         f"{r['bare_items_s']['median']:.0f}", f"{on['runner_items_s']['median']:.0f}",
                         fmt_range(on["E"], 2), f"{off['runner_items_s']['median']:.0f}", fmt_range(off["E"], 2)])
    title = (f"E with S3 latency (a proxy adds it to each request), runner end to end / bare loop; micro-batch "
             f"{args.batch}, chunk {args.chunk}, {args.new_tokens} new tokens, greedy, EOS off; {rounds} "
             "interleaved rounds, median [range]")
    text = table(title, ["model", "params", "items", "S3 latency", "bare it/s", "it/s overlap", "E overlap",
                         "it/s in line", "E in line"], rows)
    targets = []
    target = next((r for r in out if r["model"] == TARGET_SIZE), None)
    if target is not None and TARGET_DELAY in delays:
        e = target[variant(TARGET_DELAY, "on")]["E"]["median"]
        targets.append({"target": f"E >= 0.90 at 4M with {TARGET_DELAY} ms of S3 latency (overlap on)",
                        "holds": e >= 0.90, "measured": e})
        print(f"target E >= 0.90 at 4M with {TARGET_DELAY} ms of S3 latency: {verdict(e >= 0.90)} (measured {e:.3f})")
    result = {"delays_ms": delays, "rounds": rounds, "chunk": args.chunk, "batch": args.batch,
              "new_tokens": args.new_tokens, "sizes": out, "table": text, "targets": targets,
              "proxy_requests": {d: px.requests for d, px in proxies.items()}}
    write_json("s3latency", result)
    return result


if __name__ == "__main__":
    main()
