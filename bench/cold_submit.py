"""The cold path: ``aigc submit --items FILE --wait`` on the embedded default (SQLite, a folder, the
in-process worker), a fresh process each time, against a bare loop of batched ``generate`` on the same
checkpoint and prompts in this (warm) process. Also the same command with its two head starts turned
off (torch and the backend imported on a thread while the job is written; the process ended without
torch's teardown), to show what they buy. Interleaved rounds; ratio = bare seconds / command seconds.

    python -m bench.cold_submit [--quick] [--rounds 3] [--items 512]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from bench.common import (
    BareText,
    build_text_model,
    fmt_range,
    headline_prompts,
    interleave_many,
    one_torch_thread,
    quick_arg,
    summary,
    table,
    verdict,
    write_json,
)

TARGET = 0.5
NEW_TOKENS, BATCH, CHUNK = 32, 16, 32
PARAMS = ["-p", f"max_new_tokens={NEW_TOKENS}", "-p", "do_sample=false", "-p", "stop_at_eos=false"]


def _as_before(argv: list[str]) -> None:
    """``aigc`` with no warm-up thread and the ordinary interpreter exit (what it did before):
    ``main``, not the console script's ``console_main``."""
    import scheduler.cli.root as root
    from scheduler.runners import InProcessRunner

    InProcessRunner.warm = lambda self, client, model: None  # type: ignore[method-assign]
    sys.argv = ["aigc", *argv]
    root.main()


def _command(env: dict[str, str], cwd: Path, items: Path, *, before: bool) -> float:
    args = ["submit", "--items", str(items), "--model", "cold", *PARAMS, "--wait"]
    cmd = ([sys.executable, "-m", "bench.cold_submit", "--as-before", *args] if before
           else [str(Path(sys.executable).with_name("aigc")), *args])
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    took = time.perf_counter() - t0
    if r.returncode != 0 or "ok" not in r.stdout:
        raise RuntimeError(f"aigc submit --wait failed ({r.returncode}): {r.stdout[-500:]} {r.stderr[-2000:]}")
    return took


def main(argv=None) -> dict:
    p = quick_arg()
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--items", type=int, default=512)
    args = p.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 3)
    one_torch_thread()
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        model = build_text_model(tmp / "model", n_layer=2, n_embd=128, n_head=4)  # the demo's size
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIGC_")}
        env.update(AIGC_DATABASE_URL=f"sqlite:///{tmp}/aigc.db", AIGC_STORAGE_URL=f"file://{tmp}/data",
                   AIGC_CACHE_DIR=str(tmp / "cache"), AIGC_TORCH_THREADS="1", AIGC_MICRO_BATCH_SIZE=str(BATCH),
                   AIGC_CHUNK_SIZE=str(CHUNK), PYTHONPATH=str(root))
        aigc = str(Path(sys.executable).with_name("aigc"))
        subprocess.run([aigc, "models", "register", "cold", model.as_uri()], env=env, check=True,
                       capture_output=True, timeout=300)
        prompts = headline_prompts(args.items)
        items = tmp / "items.jsonl"
        items.write_text("".join(json.dumps({"custom_id": str(i), "prompt": p}) + "\n" for i, p in enumerate(prompts)))
        bare = BareText(model)
        bare.run(prompts[:BATCH], chunk_size=CHUNK, batch_size=BATCH, new_tokens=NEW_TOKENS)  # warm-up
        _command(env, tmp, items, before=False)  # warm-up: the page cache, not timed
        runs = interleave_many(rounds, {
            "bare": partial(bare.run, prompts, chunk_size=CHUNK, batch_size=BATCH, new_tokens=NEW_TOKENS),
            "now": partial(_command, env, tmp, items, before=False),
            "before": partial(_command, env, tmp, items, before=True)})
    ratio = {k: summary([b / t for b, t in zip(runs["bare"], runs[k], strict=True)]) for k in ("now", "before")}
    secs = {k: summary(v) for k, v in runs.items()}
    holds = ratio["now"]["median"] >= TARGET
    t = table(f"Cold `aigc submit --items FILE --wait` ({args.items} items), embedded default, demo-size model "
              f"(2L-128w), {NEW_TOKENS} tokens, batch {BATCH}; {rounds} interleaved rounds, median [range]",
              ["what", "seconds", "bare / this"],
              [["bare batched generate (warm, in process)", fmt_range(secs["bare"], 2), "1"],
               ["submit --wait (warm-up thread, fast exit)", fmt_range(secs["now"], 2), fmt_range(ratio["now"], 2)],
               ["submit --wait without them", fmt_range(secs["before"], 2), fmt_range(ratio["before"], 2)]])
    result = {"rounds": rounds, "items": args.items, "seconds": secs, "ratio": ratio, "tables": [t],
              "targets": [{"target": f"cold submit --wait >= {TARGET} of bare (demo size)",
                           "measured": ratio["now"]["median"], "holds": holds}]}
    print(f"target: bare / cold submit --wait >= {TARGET}: {verdict(holds)}")
    write_json("cold_submit", result)
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--as-before":
        _as_before(sys.argv[2:])
    else:
        main()
