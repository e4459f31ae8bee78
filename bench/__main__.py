"""Run every benchmark, each in a process of its own, then print the targets: ``python -m bench [--quick]``.

    python -m bench --quick                 # the whole suite, shorter runs
    python -m bench efficiency overhead     # some of them
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from bench.common import RESULTS, table

# bulk_submit before scaling: the paper estimate reads its insert rate.
ALL = ("efficiency", "overhead", "machinery", "s3latency", "s3put", "naive", "bulk_submit", "pinning", "scaling",
       "media", "wait_latency", "cold_submit", "reuse")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run (default: all): {', '.join(ALL)}")
    p.add_argument("--quick", action="store_true", help="fewer pairs, sizes and items (the suite in ~10 min)")
    args = p.parse_args(argv)
    names = args.names or list(ALL)
    if unknown := [n for n in names if n not in ALL]:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(ALL)}")
    rows, failed, timings = [], [], {}
    for name in names:
        print(f"\n===== bench.{name}{' --quick' if args.quick else ''} =====", flush=True)
        t0 = time.monotonic()
        rc = subprocess.call([sys.executable, "-m", f"bench.{name}", *(["--quick"] if args.quick else [])])
        timings[name] = round(time.monotonic() - t0, 1)
        if rc != 0:
            failed.append(name)
            rows.append([name, "(benchmark failed)", f"exit {rc}", ""])
            continue
        data = json.loads((RESULTS / f"{name}.json").read_text())
        for t in data.get("targets", []):
            m = t["measured"]
            rows.append([name, t["target"], "HOLDS" if t["holds"] else "MISSED",
                         f"{m:.3g}" if isinstance(m, float) else m])
    text = table("Targets", ["benchmark", "target", "verdict", "measured"], rows)
    table("Seconds per benchmark", ["benchmark", "seconds"], [[k, v] for k, v in timings.items()])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "summary.json").write_text(json.dumps({"quick": args.quick, "seconds": timings, "targets": rows,
                                                      "failed": failed, "table": text}, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
