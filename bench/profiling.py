"""Where the time goes: cProfile around an in-process ``worker.pipeline.run_chunk`` against the real
PostgreSQL and S3, summarised by category (db / s3 / generate / other) and by pipeline step.

Only the calling thread is profiled, so the sum of the categories is wall time. Uploads run in the
pipeline's thread pool: the calling thread waits for them in ``concurrent.futures``, counted as s3.
Self time in builtins and neutral helpers (locks, threading, contextlib, ...) goes to the nearest
caller that has a category, split in proportion to the calls' cumulative time.
"""

from __future__ import annotations

import cProfile
import pstats
import time
from collections import defaultdict
from typing import Any

CATEGORIES = {
    "db": ("sqlalchemy", "psycopg"),
    "s3": ("botocore", "boto3", "urllib3", "s3transfer", "http/client", "concurrent/futures"),
    "generate": ("torch", "transformers", "tokenizers", "safetensors", "diffusers", "aigc_models/",
                 "soundfile", "PIL/"),
}
NEUTRAL = ("~", "threading.py", "queue.py", "contextlib.py", "weakref.py", "functools.py", "abc.py",
           "typing.py", "enum.py", "_weakrefset.py", "selectors.py", "socket.py", "ssl.py")
# The pipeline's steps, by function name in worker/pipeline.py, worker/store.py and aigc_core/jobs.py.
STEPS = ("claim", "begin_batch", "_renew", "_generate_isolated", "store_and_commit", "_store_one",
         "finalize_if_done", "release_ready", "record_event", "provenance", "_json")


def category(filename: str) -> str | None:
    f = filename.replace("\\", "/")
    for cat, needles in CATEGORIES.items():
        if any(n in f for n in needles):
            return cat
    if f == "~" or any(f.endswith(n) for n in NEUTRAL):
        return None
    return "other"


Func = tuple[str, int, str]  # (file, line, function name)
Entry = tuple[int, int, float, float, dict[Func, tuple[int, int, float, float]]]


def raw_stats(stats: pstats.Stats) -> dict[Func, Entry]:
    """pstats' table: func -> (cc, nc, tt, ct, callers{caller: (cc, nc, tt, ct)})."""
    return stats.stats  # type: ignore[attr-defined]  # typeshed omits Stats.stats (set by load_stats)


def by_category(stats: pstats.Stats) -> dict[str, float]:
    raw = raw_stats(stats)
    memo: dict[Any, dict[str, float]] = {}

    def share(func, seen: frozenset) -> dict[str, float]:
        """How a second of this function's self time splits over the categories."""
        if func in memo:
            return memo[func]
        cat = category(func[0])
        if cat is not None:
            memo[func] = {cat: 1.0}
            return memo[func]
        callers = {c: v[3] for c, v in raw.get(func, (0, 0, 0, 0, {}))[4].items() if c not in seen}
        total = sum(callers.values())
        if not total or len(seen) > 30:
            return {"other": 1.0}
        mix: dict[str, float] = defaultdict(float)
        for c, w in callers.items():
            for k, v in share(c, seen | {func}).items():
                mix[k] += v * w / total
        memo[func] = dict(mix)
        return memo[func]

    out: dict[str, float] = defaultdict(float)
    for func, (_, _, tt, _, _) in raw.items():
        if tt:
            for k, v in share(func, frozenset()).items():
                out[k] += tt * v
    return dict(out)


def steps(stats: pstats.Stats) -> dict[str, dict[str, float]]:
    """Cumulative seconds and calls of the pipeline's own steps (they nest: store_and_commit holds the uploads)."""
    res: dict[str, dict[str, float]] = {}
    for (fn, _, name), (_, nc, _, ct, _) in raw_stats(stats).items():
        if name in STEPS and any(f in fn for f in ("worker/pipeline.py", "worker/store.py", "aigc_core/jobs.py")):
            r = res.setdefault(name, {"seconds": 0.0, "calls": 0})
            r["seconds"] += ct
            r["calls"] += nc
    return res


def profile_chunks(rt, job_id: str, chunk_nos: list[int]) -> dict[str, Any]:
    """Run the chunks in this process under cProfile; returns wall seconds, categories and steps."""
    from worker.pipeline import run_chunk

    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for c in chunk_nos:
        run_chunk(rt, job_id, c)
    prof.disable()
    wall = time.perf_counter() - t0
    stats = pstats.Stats(prof)
    return {"wall_s": wall, "categories": by_category(stats), "steps": steps(stats), "stats": stats}


def top(stats: pstats.Stats, n: int = 15) -> list[tuple[str, int, float, float]]:
    """The n functions with most self time: (function, calls, self s, cumulative s)."""
    rows = sorted(raw_stats(stats).items(), key=lambda kv: kv[1][2], reverse=True)[:n]
    return [(f"{fn.rsplit('/', 1)[-1]}:{ln}({name})", nc, tt, ct) for (fn, ln, name), (_, nc, tt, ct, _) in rows]
