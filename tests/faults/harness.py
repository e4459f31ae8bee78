"""The fault-injection harness: real servers and processes, faults triggered on database state, and an
invariant checker that reads the database and the bucket afterwards.

``FaultEnv`` owns what lives for a whole run (a redis-server of its own, the S3 server behind a proxy
that can cut it, the tiny model); ``FaultEnv.run(name)`` gives one scenario a fresh PostgreSQL
database, bucket and Redis, an ``aigc scheduler`` (beat + reconciler) and worker processes, and
checks the invariants when it ends. Used by ``tests/faults`` and by ``python -m bench.faults``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import create_engine, func, select, text

from tests.faults.servers import TcpProxy
from tests.support.redisserver import RedisServer
from tests.support.workers import ServiceProc, WorkerProc, start_worker

ROOT = Path(__file__).resolve().parents[2]
AIGC = str(Path(sys.executable).parent / "aigc")


@dataclass
class Report:
    """One scenario's figures. It passes when nothing is lost and no item has two committed outputs."""

    scenario: str
    submitted: int = 0
    succeeded: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    cancelled: int = 0
    lost: int = 0
    executions: int = 0  # item generations the workers logged (a run killed mid-batch logs none)
    duplicate_executions: int = 0
    duplicate_outputs: int = 0
    # Objects under items/ that no committed row names (a delivery that lost its items wrote them):
    # never an output, removed by the delivery or at finalize; one that lands later stays unnamed.
    orphans: int = 0
    recovery_s: float | None = None
    wall_s: float = 0.0
    checks: list[str] = field(default_factory=list)  # scenario-specific expectations that did not hold
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.lost == 0 and self.duplicate_outputs == 0 and not self.checks

    def expect(self, ok: bool, what: str) -> None:
        if not ok:
            self.checks.append(what)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


class FaultEnv:
    """The long-lived parts: Redis (ours, restartable), the S3 proxy, the model files."""

    def __init__(self, root: Path, pg_admin_url: str, s3_server, model_dir: Path):
        self.root, self.pg_admin_url, self.s3, self.model_dir = root, pg_admin_url, s3_server, model_dir
        self.redis = RedisServer(root / "redis", aof=True)
        self.redis.start()
        endpoint = urlsplit(s3_server.endpoint)
        self.proxy = TcpProxy((endpoint.hostname, endpoint.port))

    def close(self) -> None:
        self.proxy.cut()
        self.redis.stop()

    @contextmanager
    def run(self, name: str, **settings: str) -> Iterator[Run]:
        run = Run(self, name, settings)
        try:
            yield run
        finally:
            run.close()


class Run:
    """One scenario: its own database, bucket, Redis contents, scheduler and workers."""

    def __init__(self, env: FaultEnv, name: str, overrides: dict[str, str]):
        from aigc_core.db import Database, normalize_url

        self.env, self.name = env, name
        self.dir = env.root / f"{name}-{uuid.uuid4().hex[:6]}"
        self.dir.mkdir(parents=True)
        self.db_name = f"aigc_fault_{uuid.uuid4().hex[:10]}"
        self._admin = create_engine(normalize_url(env.pg_admin_url), isolation_level="AUTOCOMMIT")
        with self._admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{self.db_name}"'))
        self.db_url = env.pg_admin_url.rsplit("/", 1)[0] + f"/{self.db_name}"
        Database(self.db_url).upgrade()
        self.bucket = f"fault-{uuid.uuid4().hex[:10]}"
        env.s3.create_bucket(self.bucket)
        if not env.redis.ping():
            env.redis.start()
        _redis(env.redis.url()).flushall()
        self.env_vars = {
            **env.s3.env,
            "AIGC_S3_ENDPOINT_URL": env.proxy.url,  # workers reach S3 through the proxy a fault can cut
            "AIGC_DATABASE_URL": self.db_url, "AIGC_BROKER_URL": env.redis.url(),
            "AIGC_STORAGE_URL": f"s3://{self.bucket}/out", "AIGC_CACHE_DIR": str(self.dir / "cache"),
            "AIGC_TORCH_THREADS": "1", "AIGC_LOG_JSON": "1",
            # Sidecars on (not the default): two objects per item, and the checker holds both to the row.
            "AIGC_PROVENANCE_SIDECARS": "true",
            "AIGC_CHUNK_SIZE": "8", "AIGC_MICRO_BATCH_SIZE": "2",
            "AIGC_LEASE_S": "8", "AIGC_REPUBLISH_AFTER_S": "60", "AIGC_LOST_MESSAGE_AFTER_S": "3",
            "AIGC_VISIBILITY_TIMEOUT_S": "60", "AIGC_RECONCILE_EVERY_S": "1", "AIGC_SCHEDULER_TICK_S": "1",
            **overrides,
        }
        self.procs: list[ServiceProc] = []
        self.workers: list[WorkerProc] = []
        self._client = None
        self.t0 = time.monotonic()

    # ---- processes -------------------------------------------------------------------------------

    @property
    def client(self):
        if self._client is None:
            self._client = self.new_client()
        return self._client

    @contextlib.contextmanager
    def run_env(self):
        """This run's AIGC_* and AWS_* environment, swapped in for the test process meanwhile."""
        old = {k: os.environ.get(k) for k in self.env_vars}
        os.environ.update(self.env_vars)
        try:
            yield
        finally:
            for k, v in old.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)

    def new_client(self):
        """A Client as this run's processes see it: settings read, and the store and database opened
        (boto3 resolves its credentials then), inside this run's environment."""
        from aigc_core.settings import Settings
        from scheduler import Client

        with self.run_env():
            c = Client(Settings())
            _ = c.store, c.db  # opened on first use: here, while the environment is this run's
            return c

    def register_model(self, name: str = "tiny", backend: str = "hf-causal-lm", **defaults: Any) -> None:
        """The model uploaded straight to S3 (not through the proxy), registered by digest."""
        from aigc_core.registry import dir_digest

        c = self.env.s3.client()
        for p in sorted(self.env.model_dir.rglob("*")):
            if p.is_file():
                c.upload_file(str(p), self.bucket, f"models/{name}/{p.relative_to(self.env.model_dir).as_posix()}")
        with self.run_env():  # registration lists the prefix with the run's credentials
            self.client.register_model(name, "text", f"s3://{self.bucket}/models/{name}/", backend=backend,
                                       digest=dir_digest(self.env.model_dir),
                                       defaults={"max_new_tokens": 48, "do_sample": False, "stop_at_eos": False,
                                                 **defaults})

    def start_worker(self, **kw) -> WorkerProc:
        w = start_worker(self.env_vars | kw.pop("env", {}), self.dir, **kw)
        self.workers.append(w)
        self.procs.append(w)
        return w

    def start_scheduler(self) -> ServiceProc:
        log_path = self.dir / f"scheduler-{len(self.procs)}.log"
        proc = subprocess.Popen([AIGC, "scheduler"], stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
                                env={**os.environ, **self.env_vars, "PYTHONUNBUFFERED": "1"}, cwd=self.dir,
                                start_new_session=True)
        p = ServiceProc(proc, log_path)
        self.procs.append(p)
        wait_for(lambda: " ready." in p.log() or proc.poll() is not None, 60, "aigc scheduler ready")
        assert proc.poll() is None, f"aigc scheduler exited:\n{p.log()[-3000:]}"
        return p

    def close(self) -> None:
        for p in self.procs:
            p.kill()
        if self._client is not None:
            self._client.db.engine.dispose()
        from aigc_core.db import database

        database.cache_clear()
        with self._admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)'))
        self._admin.dispose()

    # ---- reading state ---------------------------------------------------------------------------

    def counts(self, job_id: str) -> Counter:
        from aigc_core.schema import Item

        with self.client.db.session() as s:
            return Counter({st.value: n for st, n in s.execute(
                select(Item.status, func.count()).where(Item.job_id == job_id).group_by(Item.status))})

    def wait_until(self, predicate: Callable[[], bool], timeout: float, what: str, poll: float = 0.02) -> float:
        return wait_for(predicate, timeout, f"{self.name}: {what}", poll)

    def wait_final(self, job_id: str, timeout: float = 180) -> Any:
        self.wait_until(lambda: self.client.status(job_id).final, timeout, f"job {job_id} final", poll=0.2)
        return self.client.status(job_id)

    def worker_logs(self) -> str:
        return "".join(w.log() for w in self.workers)

    # ---- the invariant checker ------------------------------------------------------------------

    def check(self, job_ids: list[str], *, fault_cleared_at: float | None = None) -> Report:
        """Read the database and the bucket: what is lost, what ran twice, what was committed twice."""
        from aigc_core.jobs import sidecar_of
        from aigc_core.schema import Artifact, Item, ItemStatus

        rep = Report(self.name, wall_s=round(time.monotonic() - self.t0, 2))
        s3 = self.env.s3.client()
        keys = _list_keys(s3, self.bucket, "out/jobs/")  # key -> when it was last written
        with self.client.db.session() as s:
            rows = s.execute(
                select(Item.job_id, Item.index, Item.status, Item.error, Item.finished_at,
                       Artifact.key, Artifact.sha256, Artifact.provenance, Artifact.created_at)
                .outerjoin(Artifact, Artifact.item_id == Item.id).where(Item.job_id.in_(job_ids))
            ).all()
            extra_rows = s.scalar(
                select(func.count()).select_from(
                    select(Artifact.item_id).join(Item, Item.id == Artifact.item_id)
                    .where(Item.job_id.in_(job_ids)).group_by(Artifact.item_id)
                    .having(func.count() > 1).subquery()))
        rep.submitted = len(rows)
        finished_after = []
        for r in rows:
            if r.status == ItemStatus.succeeded:
                rep.succeeded += 1
                if not self._output_intact(s3, r, keys):
                    rep.lost += 1  # succeeded without its object, or the object is not what the row says
            elif r.status == ItemStatus.failed:
                reason = (r.error or "?").split(":")[0][:60]
                rep.failed[reason] = rep.failed.get(reason, 0) + 1
            elif r.status == ItemStatus.cancelled:
                rep.cancelled += 1
            else:
                rep.lost += 1  # still open when the job was meant to be over
            if r.finished_at is not None:
                finished_after.append(r.finished_at.timestamp())
        # One committed output per item: a second artifact row is a duplicate. Objects are per delivery,
        # so a second object for an index is a loser's write: an orphan, which no row, manifest or
        # result names (checked above: each committed row's own object and sidecar are intact).
        rep.duplicate_outputs = extra_rows or 0
        named = {f"out/{k}" for r in rows if r.key is not None for k in (r.key, sidecar_of(r.key))}
        rep.orphans = len({k for k in keys if "/items/" in k and k.split("/")[2] in job_ids} - named)
        rep.executions, rep.duplicate_executions = executions(self.worker_logs(), job_ids)
        if fault_cleared_at is not None:
            after = [t for t in finished_after if t >= fault_cleared_at]
            rep.recovery_s = round(min(after) - fault_cleared_at, 2) if after else None
        return rep

    def _output_intact(self, s3, row, keys: dict[str, datetime]) -> bool:
        """The object exists and is what the row says; its sidecar is the committed attempt's; neither
        was written again after the commit (a late write of equal bytes is an overwrite all the same:
        the next one may differ)."""
        if row.key is None or f"out/{row.key}" not in keys:
            return False
        committed = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=UTC)
        from aigc_core.jobs import sidecar_of

        if any(keys.get(f"out/{k}", committed) > committed + timedelta(seconds=2)  # S3 stamps whole seconds
               for k in (row.key, sidecar_of(row.key))):
            return False
        body = s3.get_object(Bucket=self.bucket, Key=f"out/{row.key}")["Body"].read()
        if hashlib.sha256(body).hexdigest() != row.sha256:
            return False
        from aigc_core.jobs import sidecar_of

        sidecar_key = f"out/{sidecar_of(row.key)}"
        if sidecar_key not in keys:
            return False
        sidecar = json.loads(s3.get_object(Bucket=self.bucket, Key=sidecar_key)["Body"].read())
        return sidecar.get("attempt") == (row.provenance or {}).get("attempt")


def executions(logs: str, job_ids: list[str]) -> tuple[int, int]:
    """(item generations, items generated more than once), from the workers' JSON log lines (one per
    micro-batch)."""
    runs: Counter = Counter()
    wanted = set(job_ids)
    for line in logs.splitlines():
        if '"items"' not in line or not line.startswith("{"):
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("job_id") in wanted and rec.get("message", "").startswith("generated"):
            for i in rec.get("items", []):
                runs[(rec["job_id"], i)] += 1
    return sum(runs.values()), sum(n - 1 for n in runs.values() if n > 1)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, poll: float = 0.05) -> float:
    """Poll until true; returns the time.time() it became true."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return time.time()
        except Exception:  # a server being faulted may refuse the read: keep polling
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(poll)


def _list_keys(s3, bucket: str, prefix: str) -> dict[str, datetime]:
    keys: dict[str, datetime] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys |= {o["Key"]: o["LastModified"] for o in page.get("Contents", [])}
    return keys


def _redis(url: str):
    import redis

    return redis.Redis.from_url(url)
