"""Shared setup for the benchmarks: a fresh PostgreSQL database, a Redis database, a real S3 server
(SeaweedFS), real Celery workers, tiny real models, and the plain tables and JSON each one writes.

Everything a benchmark compares runs in one process run, interleaved, and is reported as ratios:
the machine is shared, so absolute timings drift while ratios measured side by side hold.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

# Quiet model libraries: the tables are the output.
for _k, _v in (("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TQDM_DISABLE", "1"), ("TRANSFORMERS_VERBOSITY", "error"),
               ("DIFFUSERS_VERBOSITY", "error"), ("TOKENIZERS_PARALLELISM", "false"),
               # the null backend is the benchmarks' own, not the product's: workers are told where it is
               ("AIGC_BACKENDS", "null=bench.null:NullGenerator")):
    os.environ.setdefault(_k, _v)

from tests.support.s3server import S3Server, start_s3_server  # noqa: E402
from tests.support.workers import ServiceProc, WorkerProc, start_worker  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().with_name("results")
PG_ADMIN_URL = os.environ.get("AIGC_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("AIGC_BENCH_REDIS_URL", "redis://127.0.0.1:6379")
# The test suite flushes one of Redis databases 2-15 (picked per session); 1 is never one of them.
REDIS_DB = int(os.environ.get("AIGC_BENCH_REDIS_DB", 1))
BUCKET = "bench"

# Greedy with EOS off: every item makes exactly max_new_tokens tokens, in the runner and the bare loop.
def text_params(new_tokens: int) -> dict[str, Any]:
    return {"max_new_tokens": new_tokens, "do_sample": False, "temperature": 0.0, "stop_at_eos": False}


# ---- the stack: PostgreSQL, Redis, S3, workers ------------------------------------------------------

def create_database() -> str:
    """A fresh PostgreSQL database for this run, migrated with Alembic (as tests/conftest.py does)."""
    from sqlalchemy import create_engine, text

    from aigc_core.db import Database, normalize_url

    name = f"aigc_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(normalize_url(PG_ADMIN_URL), isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    db = Database(url)
    db.upgrade()
    db.engine.dispose()
    return url


def drop_database(url: str) -> None:
    from sqlalchemy import create_engine, text

    from aigc_core.db import database, normalize_url

    database.cache_clear()
    name = url.rsplit("/", 1)[1]
    admin = create_engine(normalize_url(PG_ADMIN_URL), isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@dataclass
class Stack:
    """Real servers for one benchmark run; ``with Stack("name") as st:`` starts and removes them."""

    name: str
    chunk_size: int = 32
    micro_batch_size: int = 16
    tmp: Path = field(init=False)
    pg_url: str = field(init=False, default="")
    redis_url: str = field(init=False, default="")
    s3: S3Server | None = field(init=False, default=None)
    procs: list[ServiceProc] = field(init=False, default_factory=list)

    def __enter__(self) -> Stack:
        import redis

        self.tmp = Path(tempfile.mkdtemp(prefix=f"aigc-bench-{self.name}-"))
        try:
            self.redis_url = f"{REDIS_URL}/{REDIS_DB}"
            redis.Redis.from_url(self.redis_url).flushdb()
            self.pg_url = create_database()
            self.s3 = start_s3_server(self.tmp / "s3")
            self.s3.create_bucket(BUCKET)
            os.environ.update(self.s3.env)  # boto3's default chain, in this process too
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for p in reversed(self.procs):
            p.stop()
        if self.s3 is not None:
            self.s3.stop()
        if self.pg_url:
            drop_database(self.pg_url)
        if self.redis_url:
            import redis

            redis.Redis.from_url(self.redis_url).flushdb()
        if os.environ.get("AIGC_BENCH_KEEP") != "1":
            shutil.rmtree(self.tmp, ignore_errors=True)

    @property
    def env(self) -> dict[str, str]:
        """AIGC_* settings as a deployment sets them, for worker processes."""
        return {
            "AIGC_DATABASE_URL": self.pg_url,
            "AIGC_BROKER_URL": self.redis_url,
            "AIGC_STORAGE_URL": f"s3://{BUCKET}/outputs",
            "AIGC_CACHE_DIR": str(self.tmp / "cache"),
            "AIGC_CHUNK_SIZE": str(self.chunk_size),
            "AIGC_MICRO_BATCH_SIZE": str(self.micro_batch_size),
            "AIGC_TORCH_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            **(self.s3.env if self.s3 else {}),
        }

    def settings(self, **overrides: Any):
        from aigc_core.settings import Settings

        e = self.env
        base = dict(database_url=e["AIGC_DATABASE_URL"], broker_url=e["AIGC_BROKER_URL"],
                    storage_url=e["AIGC_STORAGE_URL"], s3_endpoint_url=e["AIGC_S3_ENDPOINT_URL"],
                    cache_dir=Path(e["AIGC_CACHE_DIR"]), chunk_size=self.chunk_size,
                    micro_batch_size=self.micro_batch_size, torch_threads=1)
        return Settings(**{**base, **overrides})

    def client(self, **overrides: Any):
        """A client exactly as a user makes one (``broker_url=None``: submit without publishing)."""
        from scheduler import Client

        return Client(self.settings(**overrides))

    def worker(self, queues: str = "text", *, pool: str = "solo", concurrency: int = 1,
               env: dict[str, str] | None = None) -> WorkerProc:
        w = start_worker({**self.env, **(env or {})}, self.tmp, queues=queues, pool=pool,
                         concurrency=concurrency, timeout=120)
        self.procs.append(w)
        return w

    def celery(self, app: str, queues: str, env: dict[str, str] | None = None) -> WorkerProc:
        w = start_worker({**self.env, **(env or {})}, self.tmp, queues=queues, timeout=90.0, app=app)
        self.procs.append(w)
        return w

    def stop(self, w: ServiceProc) -> None:
        w.stop()
        if w in self.procs:
            self.procs.remove(w)


# ---- jobs: submit, wait, check ----------------------------------------------------------------------

def utc_seconds(t: datetime) -> float:
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()


def wait_final(client, job_id: str, *, timeout: float = 600, poll_s: float = 0.2) -> tuple[str, float]:
    """Wait until the job is final; returns (status, finished_at as epoch seconds, the worker's clock).

    The end time is the worker's own commit time, not when this poll noticed it, so the poll can be
    slow and leave the CPU to the worker."""
    from sqlalchemy import select

    from aigc_core.schema import Job

    deadline = time.monotonic() + timeout
    while True:
        with client.db.session() as s:
            row = s.execute(select(Job.status, Job.finished_at).where(Job.id == job_id)).one()
        if row.finished_at is not None:
            return row.status.value, utc_seconds(row.finished_at)
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {row.status.value} after {timeout}s")
        time.sleep(poll_s)


def run_job(client, model: str, items: list, *, params: dict | None = None, kind: str = "text",
            chunk_size: int | None = None, timeout: float = 600) -> dict[str, Any]:
    """Submit as a user would and wait: seconds from before submit to the job's final commit."""
    t0 = time.time()
    job = client.submit(kind, model=model, items=items, params=params or {}, chunk_size=chunk_size)
    t_sub = time.time() - t0
    status, t_end = wait_final(client, job.id, timeout=timeout)
    return {"job_id": job.id, "status": status, "seconds": t_end - t0, "submit_s": t_sub, "items": len(items)}


def check_outputs(client, job_id: str, n: int, *, sidecars: bool | None = None) -> None:
    """Every item succeeded, has its Artifact row, and its object (and provenance sidecar, when the
    worker writes them: AIGC_PROVENANCE_SIDECARS; None: the default setting's) and the manifest are in S3."""
    from sqlalchemy import func, select

    from aigc_core.settings import Settings

    if sidecars is None:
        sidecars = Settings.model_fields["provenance_sidecars"].default

    from aigc_core.jobs import job_prefix
    from aigc_core.schema import Artifact, Item, ItemStatus

    with client.db.session() as s:
        ok = s.scalar(select(func.count()).select_from(Item)
                      .where(Item.job_id == job_id, Item.status == ItemStatus.succeeded))
        arts = s.scalar(select(func.count()).select_from(Artifact).where(Artifact.job_id == job_id))
    keys = set(client.store.list(job_prefix(job_id) + "/"))
    items = [k for k in keys if "/items/" in k]
    want = n * (2 if sidecars else 1)
    manifest = f"{job_prefix(job_id)}/manifest.jsonl" in keys
    if not (ok == arts == n and len(items) == want and manifest):
        raise AssertionError(f"job {job_id}: {ok} succeeded, {arts} artifacts, {len(items)} objects "
                             f"(want {n}, {n}, {want}), manifest {manifest}")


NO_SIDECARS = {"AIGC_PROVENANCE_SIDECARS": "false"}  # a worker that writes one object per item (the default)
SIDECARS = {"AIGC_PROVENANCE_SIDECARS": "true"}  # two: each output and its provenance sidecar


def headline_prompts(n: int) -> list[str]:
    """The demo's headlines as prompts, cycled to n."""
    raw = resources.files("aigc_models").joinpath("data/demo_headlines.txt").read_text(encoding="utf-8")
    heads = [h.strip() for h in raw.splitlines() if h.strip()]
    return [f"Headline: {heads[i % len(heads)]}\n\n" for i in range(n)]


# ---- tiny real models -------------------------------------------------------------------------------

_TOKENIZERS: dict[int, Any] = {}


def build_text_model(out: Path, *, n_layer: int, n_embd: int, n_head: int, vocab_size: int = 4096) -> Path:
    """A GPT-2 of the given shape with the demo's tokenizer recipe (byte-level BPE on the news corpus),
    randomly initialised and saved with save_pretrained: loaded through the same code as a real checkpoint.
    2 layers x 128 wide with a 4096 vocabulary is the ``aigc demo`` model's size."""
    from aigc_models.tiny_text import save, tiny_gpt2, train_tokenizer
    from tests.support.models import corpus_texts

    if (out / "model.safetensors").exists():
        return out
    if vocab_size not in _TOKENIZERS:
        _TOKENIZERS[vocab_size] = train_tokenizer(corpus_texts(), vocab_size=vocab_size)
    tok = _TOKENIZERS[vocab_size]
    model = tiny_gpt2(tok, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=256)
    return save(model, tok, out)


def one_torch_thread() -> None:
    """The bare loops run on one thread, like the workers (AIGC_TORCH_THREADS=1): fair on 2 cores."""
    import torch

    torch.set_num_threads(1)


class BareText:
    """The bare baseline: the same checkpoint, prompts, micro-batches and greedy EOS-off decoding as
    the text backend, in a plain loop: tokenize, ``model.generate``, decode. No database, no storage."""

    def __init__(self, path: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True).eval()

    def batches(self, prompts: Sequence[str], chunk_size: int, batch_size: int) -> list[list[str]]:
        """The runner's batching: per chunk, prompts sorted by length, then micro-batches."""
        out = []
        for c in range(0, len(prompts), chunk_size):
            chunk = sorted(prompts[c : c + chunk_size], key=len)
            out += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
        return out

    def run(self, prompts: Sequence[str], *, chunk_size: int, batch_size: int, new_tokens: int) -> float:
        import torch
        from transformers import GenerationConfig

        config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  repetition_penalty=1.0, pad_token_id=self.tok.pad_token_id,
                                  eos_token_id=self.tok.eos_token_id)
        t0 = time.perf_counter()
        with torch.inference_mode():
            for batch in self.batches(prompts, chunk_size, batch_size):
                enc = self.tok(batch, return_tensors="pt", padding=True)
                out = self.model.generate(**enc, generation_config=config)
                new = out[:, enc["input_ids"].shape[1]:]
                assert new.shape[1] == new_tokens
                [t.encode() for t in self.tok.batch_decode(new, skip_special_tokens=True)]
        return time.perf_counter() - t0


# ---- A/B pairs, tables, JSON ------------------------------------------------------------------------

def interleave(n_pairs: int, a: Callable[[], float], b: Callable[[], float]) -> list[tuple[float, float]]:
    """n pairs (a, b), alternating which runs first (ABBA...), so a drift in load hits both alike."""
    runs = interleave_many(n_pairs, {"a": a, "b": b})
    return list(zip(runs["a"], runs["b"], strict=False))


def interleave_many(n_rounds: int, fns: dict[str, Callable[[], float]]) -> dict[str, list[float]]:
    """n rounds of every variant, the order rotated each round (AB BA AB ..., ABC BCA CAB ...)."""
    names = list(fns)
    out: dict[str, list[float]] = {k: [] for k in names}
    for r in range(n_rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for k in order:
            out[k].append(fns[k]())
    return out


def summary(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt_range(s: dict[str, float], digits: int = 3) -> str:
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=False)))  # noqa: E731
    out = [title, line(cells[0]), "  ".join("-" * w for w in widths), *(line(r) for r in cells[1:])]
    text = "\n".join(out)
    print(text + "\n", flush=True)
    return text


def machine() -> dict[str, Any]:
    import torch

    return {"host": platform.node(), "cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg(),
            "python": platform.python_version(), "torch": torch.__version__, "torch_threads_bare": 1}


def write_json(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    body = {"benchmark": name, "at": datetime.now(UTC).isoformat(), "machine": machine(),
            "loadavg_at_end": os.getloadavg(), **data}
    path.write_text(json.dumps(body, indent=1, default=str) + "\n")
    print(f"wrote {path.relative_to(ROOT)}", flush=True)
    return path


def verdict(ok: bool) -> str:
    return "HOLDS" if ok else "MISSED"


def quick_arg(argv: Sequence[str] | None = None):
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="fewer pairs and sizes")
    return p


# ---- the null model and counters ---------------------------------------------------------------------

def register_null(client, tmp: Path, name: str = "null", queue: str | None = None):
    """A null model (backend ``null``: fixed bytes, no torch) registered like any checkpoint directory."""
    d = tmp / "null-model"
    d.mkdir(parents=True, exist_ok=True)
    (d / "README").write_text("the null backend reads nothing; this directory only gives the registry a URI\n")
    return client.register_model(name, "text", d.as_uri(), backend="null", queue=queue)


class SqlCounter:
    """Counts statements, rows sent in executemany and commits on an engine (this process only)."""

    def __init__(self, engine):
        from sqlalchemy import event

        self.engine, self.statements, self.commits, self.params = engine, 0, 0, 0
        event.listen(engine, "before_cursor_execute", self._stmt)
        event.listen(engine, "commit", self._commit)

    def _stmt(self, conn, cursor, statement, parameters, context, executemany) -> None:
        self.statements += 1
        self.params += len(parameters) if executemany and parameters else 1

    def _commit(self, conn) -> None:
        self.commits += 1

    def close(self) -> None:
        from sqlalchemy import event

        event.remove(self.engine, "before_cursor_execute", self._stmt)
        event.remove(self.engine, "commit", self._commit)


class RedisMonitor:
    """Counts the commands Redis runs on our database (MONITOR), by command name, while open."""

    def __init__(self, url: str, db: int = REDIS_DB):
        import threading

        import redis

        self.db, self._stop = db, False
        self.counts: dict[str, int] = {}
        self._r = redis.Redis.from_url(url)
        self._ready = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        self._ready.wait(5)

    def _run(self) -> None:
        with self._r.monitor() as m:
            self._ready.set()
            for cmd in m.listen():
                if self._stop:
                    return
                if int(cmd.get("db", -1)) == self.db:
                    name = cmd["command"].split(" ", 1)[0].upper()
                    self.counts[name] = self.counts.get(name, 0) + 1

    def close(self) -> dict[str, int]:
        self._stop = True
        self._r.ping()  # wakes the listener so it sees the flag
        self._t.join(5)
        self.counts.pop("PING", None)
        return dict(self.counts)


def task_seconds(worker_log: str, job_id: str) -> tuple[int, float]:
    """(tasks, seconds) Celery logged as run time for this job's chunks ("succeeded in Xs")."""
    import re

    pat = re.compile(r"succeeded in ([0-9.eE-]+)s: \{'job_id': '" + re.escape(job_id) + "'")
    times = [float(m.group(1)) for m in pat.finditer(worker_log)]
    return len(times), sum(times)


def efficiency_ratios(runs: dict[str, list[float]], variants, n: int) -> dict[str, dict]:
    """Per runner variant, against the interleaved bare runs: E, items/s and the extra ms per item."""
    bare = runs["bare"]
    return {v: {"E": summary([b / a for a, b in zip(runs[v], bare, strict=False)]),
                "runner_items_s": summary([n / a for a in runs[v]]),
                "extra_ms_per_item": summary([(a - b) / n * 1e3 for a, b in zip(runs[v], bare, strict=False)])}
            for v in variants}


def variant_heads(variants) -> list[str]:
    return [h for v in variants for h in (f"runner it/s ({v})", f"E (sidecars {v})", f"extra ms/item ({v})")]


def variant_cells(r: dict, variants) -> list[str]:
    return [c for v in variants for c in (f"{r[v]['runner_items_s']['median']:.1f}", fmt_range(r[v]["E"]),
                                          f"{r[v]['extra_ms_per_item']['median']:.2f}")]


def add_rounds_and_sidecars(p, pairs_help: str) -> None:
    p.add_argument("--pairs", type=int, default=None, help=pairs_help)
    p.add_argument("--sidecars", choices=("on", "off", "both"), default="both",
                   help="provenance sidecars of the runner (both: two workers, side by side)")


def rounds_and_variants(args) -> tuple[int, list[str]]:
    """(interleaved rounds, the runner variants: sidecars on and/or off)."""
    return args.pairs or (2 if args.quick else 3), (["on", "off"] if args.sidecars == "both" else [args.sidecars])
