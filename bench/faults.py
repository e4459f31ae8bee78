"""The fault-injection suite as a table of figures: ``python -m bench.faults [--fast] [scenario ...]``.

Runs every scenario of ``tests/faults/scenarios.py`` (the S3 outage lasts 30 s) against real servers it
starts itself (PostgreSQL must be up: AIGC_TEST_PG_URL, default postgres@127.0.0.1/test), prints one
row per scenario and writes ``bench/results/faults.json``. Exit status 1 if any scenario fails its
rule: lost = 0, duplicate committed outputs = 0, and the scenario's own expectations.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    from tests.faults.harness import FaultEnv, Report
    from tests.faults.scenarios import FAST, SCENARIOS
    from tests.support.models import build_tiny_text_model
    from tests.support.s3server import start_s3_server

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scenarios", nargs="*", help=f"some of: {', '.join(SCENARIOS)}")
    ap.add_argument("--fast", action="store_true", help="the subset CI runs, with an 8 s S3 outage")
    args = ap.parse_args(argv)
    names = args.scenarios or list(FAST if args.fast else SCENARIOS)
    if unknown := [n for n in names if n not in SCENARIOS]:
        ap.error(f"unknown scenario(s): {', '.join(unknown)}")

    pg = os.environ.get("AIGC_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
    reports: list[Report] = []
    with tempfile.TemporaryDirectory(prefix="aigc-faults-") as tmp:
        root = Path(tmp)
        s3 = start_s3_server(root / "s3")
        os.environ.update(s3.env)
        model = build_tiny_text_model(root / "model", n_layer=4, n_embd=128)
        env = FaultEnv(root / "runs", pg, s3, model)
        print(_header(), flush=True)
        try:
            for name in names:
                t0 = time.monotonic()
                try:
                    rep = SCENARIOS[name](env, not args.fast)
                except Exception as e:  # a scenario that cannot finish is a failure, shown in the table
                    rep = Report(name, wall_s=round(time.monotonic() - t0, 2))
                    rep.checks.append(f"did not finish: {type(e).__name__}: {e}")
                rep.scenario = name
                reports.append(rep)
                print(_row(rep), flush=True)
        finally:
            env.close()
            s3.stop()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "faults.json").write_text(json.dumps([r.as_dict() for r in reports], indent=1))
    print()
    for r in reports:
        for line in r.checks:
            print(f"FAILED {r.scenario}: {line}")
        for line in r.notes:
            print(f"note {r.scenario}: {line}")
    ok = all(r.passed for r in reports)
    print(f"\n{sum(r.passed for r in reports)}/{len(reports)} scenarios passed (lost = 0, duplicate outputs = 0, "
          f"and each scenario's own checks); JSON in {RESULTS / 'faults.json'}")
    return 0 if ok else 1


COLUMNS = ("scenario", "submitted", "succeeded", "failed", "cancelled", "lost", "dup exec", "dup outputs",
           "orphans", "recovery s", "wall s", "pass")


def _header() -> str:
    return "| " + " | ".join(COLUMNS) + " |\n|" + "|".join("---" for _ in COLUMNS) + "|"


def _row(r) -> str:
    failed = ", ".join(f"{n} {reason}" for reason, n in sorted(r.failed.items())) or "0"
    cells = (r.scenario, r.submitted, r.succeeded, failed, r.cancelled, r.lost, r.duplicate_executions,
             r.duplicate_outputs, r.orphans, "-" if r.recovery_s is None else r.recovery_s, r.wall_s,
             "yes" if r.passed else "NO")
    return "| " + " | ".join(str(c) for c in cells) + " |"


if __name__ == "__main__":
    sys.exit(main())
