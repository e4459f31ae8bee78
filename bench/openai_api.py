"""Submitting through the OpenAI-compatible API vs ``Client.submit``: a 50,000-line batch file uploaded
with the openai SDK to a real ``aigc serve`` (``files.create`` + ``batches.create``, which returns once
the file is checked, the job and its items written and its chunks published) against ``Client.submit``
of the same items, on PostgreSQL, Redis and S3, interleaved in one run. Target: API <= 2x.

    python -m bench.openai_api [--quick] [--items 50000] [--rounds 5]
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

from bench.common import (
    ROOT,
    Stack,
    fmt_range,
    headline_prompts,
    interleave,
    quick_arg,
    register_null,
    summary,
    table,
    verdict,
    write_json,
)
from tests.support.workers import ServiceProc

TARGET = 2.0
MAX_TOKENS = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(st: Stack) -> tuple[ServiceProc, str]:
    """``aigc serve`` in a process of its own on a free loopback port, as a deployment runs it."""
    port = _free_port()
    log = st.tmp / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "scheduler.cli", "serve", "--port", str(port),
                             "--log-level", "warning"], stdout=log.open("ab"), stderr=subprocess.STDOUT,
                            env={**os.environ, **st.env}, start_new_session=True, cwd=ROOT)
    server = ServiceProc(proc, log)
    st.procs.append(server)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{base}/healthz", timeout=1).read()
            return server, base
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"aigc serve did not start:\n{server.log()[-3000:]}") from None
            time.sleep(0.1)


def requests_file(tag: str, n: int) -> bytes:
    heads = headline_prompts(200)
    return "".join(json.dumps({"custom_id": f"{tag}-{i:06d}", "method": "POST", "url": "/v1/completions",
                               "body": {"model": "null", "prompt": heads[i % len(heads)], "max_tokens": MAX_TOKENS}})
                   + "\n" for i in range(n)).encode()


def items(tag: str, n: int) -> list[dict]:
    """What the API makes of requests_file's lines: the same items for Client.submit."""
    heads = headline_prompts(200)
    return [{"custom_id": f"{tag}-{i:06d}", "prompt": heads[i % len(heads)], "params": {"max_new_tokens": MAX_TOKENS}}
            for i in range(n)]


def main(argv=None) -> dict:
    p = quick_arg()
    p.add_argument("--items", type=int, default=50_000)
    p.add_argument("--rounds", type=int, default=None, help="pairs (API, client), alternating which goes first")
    args = p.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 5)
    n = args.items
    from openai import OpenAI

    from scheduler.api.keys import create_key

    with Stack("openai_api") as st:
        client = st.client(api_max_batch_requests=max(n, 50_000))
        register_null(client, st.tmp)
        key = create_key(client.db, "bench")
        os.environ["AIGC_API_MAX_BATCH_REQUESTS"] = str(max(n, 50_000))
        os.environ["AIGC_API_MAX_FILE_BYTES"] = str(256 * 1024 * 1024)
        _, base = start_serve(st)
        sdk = OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=600)
        counter = iter(range(10_000))
        sizes: list[int] = []

        def via_api() -> float:
            data = requests_file(f"a{next(counter)}", n)
            sizes.append(len(data))
            t0 = time.perf_counter()
            f = sdk.files.create(file=("requests.jsonl", data), purpose="batch")
            b = sdk.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
            took = time.perf_counter() - t0
            assert b.status == "in_progress" and b.request_counts and b.request_counts.total == n, b
            sdk.batches.cancel(b.id)
            return took

        def via_client() -> float:
            its = items(f"c{next(counter)}", n)
            t0 = time.perf_counter()
            job = client.submit("text", "null", its)
            took = time.perf_counter() - t0
            assert job.item_count == n
            client.cancel(job.id)
            return took

        via_api(), via_client()  # warm both paths (imports, connections, plans) on a first pair
        pairs = interleave(rounds, via_api, via_client)
    api, cli = [a for a, _ in pairs], [c for _, c in pairs]
    ratios = [a / c for a, c in pairs]
    s_api, s_cli, s_ratio = summary(api), summary(cli), summary(ratios)
    ok = s_ratio["median"] <= TARGET
    text = table(f"Submit {n:,} requests: API (upload + create batch) vs Client.submit, {rounds} pair(s) "
                 f"after a warm-up pair; median [min-max]",
                 ["path", "seconds", "requests/s"],
                 [["API: files.create + batches.create (openai SDK, aigc serve)", fmt_range(s_api, 2),
                   f"{n / s_api['median']:,.0f}"],
                  ["Client.submit of the same items", fmt_range(s_cli, 2), f"{n / s_cli['median']:,.0f}"],
                  ["ratio API / client (per pair)", fmt_range(s_ratio, 2), ""],
                  [f"target: API <= {TARGET:g}x", verdict(ok), ""]])
    write_json("openai_api", {"items": n, "rounds": rounds, "file_bytes": sizes[-1] if sizes else None,
                              "api_s": api, "client_s": cli, "ratios": ratios, "table": text,
                              "targets": [{"target": f"API submit of {n:,} requests <= {TARGET:g}x Client.submit",
                                           "holds": ok, "measured": s_ratio["median"]}]})
    return {"ratio": s_ratio["median"], "holds": ok}


if __name__ == "__main__":
    main()
