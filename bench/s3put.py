"""One small PUT: botocore's ``put_object`` against the runner's signed fast path (aigc_core/s3put.py).

Both against the same SeaweedFS, the same 600-byte body (an output's size) and keys, in interleaved
rounds: wall ms and this process's CPU ms per PUT, one thread, and the ratio fast / botocore.

    python -m bench.s3put [--quick] [--rounds 3] [--puts 300]
"""

from __future__ import annotations

import os
import time

from bench.common import BUCKET, Stack, fmt_range, interleave_many, quick_arg, summary, table, write_json


def main(argv=None) -> dict:
    from aigc_core.storage import S3Store

    p = quick_arg()
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--puts", type=int, default=None, help="PUTs per round and path")
    args = p.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 3)
    n = args.puts or (150 if args.quick else 300)
    body = os.urandom(600)
    with Stack("s3put") as st:
        assert st.s3 is not None  # started by Stack.__enter__
        store = S3Store(BUCKET, "s3put", endpoint_url=st.s3.endpoint)
        fast_path = store.fast
        if fast_path is None:
            raise RuntimeError("the fast path is off (a proxy in the environment, or AIGC_S3_FAST_PUT=false)")
        cpu: dict[str, list[float]] = {"botocore": [], "fast": []}

        def run(name: str, put) -> float:
            t0, c0 = time.perf_counter(), time.process_time()
            for i in range(n):
                put(f"{name}/{time.monotonic_ns()}-{i:06d}.txt")
            cpu[name].append((time.process_time() - c0) / n * 1e3)
            return (time.perf_counter() - t0) / n * 1e3

        def boto(key: str) -> None:
            store.client.put_object(Bucket=BUCKET, Key=key, Body=body, ContentType="text/plain")

        def fast(key: str) -> None:
            if fast_path.put(key, body, "text/plain") != "ok":
                raise RuntimeError("the fast path did not store the object")

        for put in (boto, fast):  # warm-up: connections, imports
            for i in range(20):
                put(f"warm/{i}")
        wall = interleave_many(rounds, {"botocore": lambda: run("botocore", boto), "fast": lambda: run("fast", fast)})
    rows, res = [], {}
    for name in ("botocore", "fast"):
        w, c = summary(wall[name]), summary(cpu[name])
        res[name] = {"wall_ms": w, "cpu_ms": c}
        rows.append([name, fmt_range(w, 3), fmt_range(c, 3)])
    ratio_cpu = res["fast"]["cpu_ms"]["median"] / res["botocore"]["cpu_ms"]["median"]
    ratio_wall = res["fast"]["wall_ms"]["median"] / res["botocore"]["wall_ms"]["median"]
    rows.append(["fast / botocore", f"{ratio_wall:.2f}", f"{ratio_cpu:.2f}"])
    t = table(f"One 600-byte PUT to SeaweedFS on loopback, {n} per round, {rounds} interleaved rounds, median [range]",
              ["path", "wall ms/PUT", "client CPU ms/PUT"], rows)
    result = {"rounds": rounds, "puts": n, "paths": res, "ratio_wall": ratio_wall, "ratio_cpu": ratio_cpu,
              "tables": [t], "targets": []}
    write_json("s3put", result)
    return result


if __name__ == "__main__":
    main()
