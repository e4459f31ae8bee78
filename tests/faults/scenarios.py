"""The fault scenarios. Each runs a real job through real processes, does one fault when the database
says the job is mid-way, and returns the checker's Report with its own expectations added.

``FAST`` is the subset CI runs; ``python -m bench.faults`` (or ``AIGC_FAULTS=full pytest tests/faults``)
runs them all, with the 30 s S3 outage.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import UTC
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, text

from tests.faults.harness import FaultEnv, Report, Run, _redis
from tests.support.models import corpus_texts
from tests.support.workers import WorkerProc

if TYPE_CHECKING:
    from tests.faults.servers import TcpProxy

JOB_ITEMS = 48


def prompts(n: int = JOB_ITEMS) -> list[dict]:
    heads = [t.split("\n", 1)[0].removeprefix("Headline: ") for t in corpus_texts()]
    return [{"custom_id": f"a{i}", "prompt": heads[i % len(heads)]} for i in range(n)]


def mid_job(run: Run, job_id: str, done: int = 4) -> Callable[[], bool]:
    """True while the job has items running and at least ``done`` committed: mid-chunk, mid-job."""
    def check() -> bool:
        c = run.counts(job_id)
        return c["running"] > 0 and c["succeeded"] >= done
    return check


def _pids_of_children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _started(run: Run, **kw):
    run.register_model()
    run.start_scheduler()
    return run.start_worker(**kw)


def mid_job_fault(env: FaultEnv, name: str, seed: int, fault: Callable[[Run, WorkerProc, str], float], *,
                  worker: dict | None = None, settings: dict | None = None,
                  after: Callable[[Run, Report], None] | None = None) -> Report:
    """The common shape: start a scheduler and a worker, submit a job, do ``fault`` once the job is
    mid-way (it returns the time the fault was cleared), wait for the job, check; it must succeed."""
    with env.run(name, **(settings or {})) as run:
        w = _started(run, **(worker or {}))
        job = run.client.submit("text", model="tiny", items=prompts(), seed=seed)
        run.wait_until(mid_job(run, job.id), 120, "mid-job")
        cleared_at = fault(run, w, job.id)
        view = run.wait_final(job.id, timeout=300)
        rep = run.check([job.id], fault_cleared_at=cleared_at)
        rep.expect(view.status.value == "succeeded", f"job ended {view.status.value}")
        rep.expect(rep.succeeded == JOB_ITEMS, "not every item succeeded")
        if after is not None:
            after(run, rep)
        return rep


# ---- the scenarios -------------------------------------------------------------------------------

def kill_worker_child(env: FaultEnv, full: bool) -> Report:
    """1. SIGKILL the prefork child mid-chunk: the parent forks a new one, the lease expires, the
    reconciler wakes the chunk, its items run again item by item."""
    def fault(run: Run, w: WorkerProc, job_id: str) -> float:
        os.kill(_pids_of_children(w.proc.pid)[0], signal.SIGKILL)
        return time.time()

    return mid_job_fault(env, "kill-child", 1, fault, worker={"pool": "prefork", "concurrency": 1})


def kill_whole_worker(env: FaultEnv, full: bool) -> Report:
    """2. SIGKILL the whole worker (two children, so two messages in flight); a new worker takes over."""
    def fault(run: Run, w: WorkerProc, job_id: str) -> float:
        w.kill()
        killed_at = time.time()
        run.start_worker()
        return killed_at

    return mid_job_fault(env, "kill-worker", 2, fault, worker={"pool": "prefork", "concurrency": 2},
                         settings={"AIGC_VISIBILITY_TIMEOUT_S": "10"})


def warm_shutdown(env: FaultEnv, full: bool) -> Report:
    """3. SIGTERM mid-job: the worker finishes its chunk and exits cleanly; the rest waits for the next."""
    seen: dict[str, Any] = {}  # rc: the exit status; left: item counts by state

    def fault(run: Run, w: WorkerProc, job_id: str) -> float:
        os.killpg(w.proc.pid, signal.SIGTERM)
        seen["rc"] = w.proc.wait(60)
        stopped_at = time.time()
        seen["left"] = run.counts(job_id)
        run.start_worker()
        return stopped_at

    def after(run: Run, rep: Report) -> None:
        rc, left = seen["rc"], seen["left"]
        rep.expect(rc == 0, f"warm shutdown exited {rc}")
        rep.expect(left["running"] == 0, f"{left['running']} items left running by a warm shutdown")
        rep.notes.append(f"worker exited {rc}; {left['pending']} items waited for the next worker")

    return mid_job_fault(env, "warm-shutdown", 3, fault, after=after)


def redis_restart(env: FaultEnv, full: bool) -> Report:
    """4. Redis restarted mid-job, its AOF kept: workers and the scheduler reconnect and go on."""
    def fault(run: Run, w: WorkerProc, job_id: str) -> float:
        env.redis.stop()
        time.sleep(2)
        env.redis.start()
        return time.time()

    return mid_job_fault(env, "redis-restart", 4, fault)


def redis_restarted_empty(env: FaultEnv, full: bool) -> Report:
    """5. Redis comes back empty (every queued message gone): the reconciler asks Redis which chunks it
    still holds and publishes the others again."""
    def fault(run: Run, w: WorkerProc, job_id: str) -> float:
        env.redis.stop(signal.SIGKILL)
        env.redis.wipe()
        env.redis.start()
        return time.time()

    def after(run: Run, rep: Report) -> None:
        logs = "".join(p.log() for p in run.procs)
        rep.expect("no message in the broker" in logs, "the reconciler never found the lost messages")

    return mid_job_fault(env, "redis-empty", 5, fault, after=after)


def submit_while_redis_down(env: FaultEnv, full: bool) -> Report:
    """6. Submit while Redis is down: accepted into the outbox, sent when Redis is back."""
    with env.run("submit-redis-down") as run:
        _started(run)
        env.redis.stop()
        t0 = time.monotonic()
        job = run.client.submit("text", model="tiny", items=prompts(), seed=6)
        submit_s = time.monotonic() - t0
        accepted = run.client.status(job.id).status.value
        time.sleep(1)
        env.redis.start()
        back_at = time.time()
        view = run.wait_final(job.id)
        rep = run.check([job.id], fault_cleared_at=back_at)
        rep.expect(accepted == "queued", f"submit while down left the job {accepted}")
        rep.expect(view.status.value == "succeeded", f"job ended {view.status.value}")
        rep.notes.append(f"submit with Redis down returned in {submit_s:.2f} s")
        return rep


def s3_outage(env: FaultEnv, full: bool) -> Report:
    """7. The S3 endpoint refuses connections for 30 s (8 s in the fast subset) mid-job."""
    outage = 30 if full else 8
    during: list[int] = []

    def fault(run: Run, w: WorkerProc, job_id: str) -> float:
        env.proxy.cut()
        cut_at = time.time()
        while time.time() - cut_at < outage:
            during.append(run.counts(job_id)["succeeded"])
            time.sleep(0.5)
        env.proxy.restore()
        return time.time()

    def after(run: Run, rep: Report) -> None:
        # Nothing may commit while its object cannot be written (the first reading may race the cut).
        rep.expect(len(set(during[1:])) <= 1, f"items committed while S3 was down: {sorted(set(during))}")
        rep.notes.append(f"outage {outage} s")

    return mid_job_fault(env, "s3-down", 7, fault, after=after)


def database_connections_killed(env: FaultEnv, full: bool) -> Report:
    """8. pg_terminate_backend on every connection of the job's database, three times, mid-job."""
    killed: list[object] = []  # a row per terminated connection

    def fault(run: Run, w: WorkerProc, job_id: str) -> float:
        for _ in range(3):
            with run._admin.connect() as c:
                killed.extend(c.execute(text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :db AND pid <> pg_backend_pid()"), {"db": run.db_name}).all())
            time.sleep(0.7)
        return time.time()

    return mid_job_fault(env, "pg-terminate", 8, fault,
                         after=lambda run, rep: rep.notes.append(f"{len(killed)} connections terminated"))


def poison(env: FaultEnv, full: bool) -> Report:
    """9. Poison: prompts too long for the model (the backend raises), prompts that kill the worker
    process each time, and a model whose files fail their digest: those fail with a reason after
    bounded attempts; every other item succeeds."""
    from aigc_core.schema import Item

    with env.run("poison") as run:
        run.register_model()
        run.register_model("crashy", backend="crash-text")
        with run.run_env():  # registration lists the prefix with the run's S3 credentials
            run.client.register_model("broken", "text", f"s3://{run.bucket}/models/tiny/", digest="sha256:" + "0" * 64)
        run.start_scheduler()
        run.start_worker(pool="prefork", concurrency=1, app="tests.faults.backends_app")
        items = prompts(24)
        for i in (3, 11, 17):
            items[i] = {"custom_id": f"long{i}", "prompt": "word " * 600}
        long_job = run.client.submit("text", model="tiny", items=items, seed=9)
        crash_items = prompts(8)
        crash_items[5] = {"custom_id": "crash", "prompt": "CRASH here"}
        crash_job = run.client.submit("text", model="crashy", items=crash_items, seed=9)
        broken_job = run.client.submit("text", model="broken", items=prompts(8), seed=9)
        views = {j.id: run.wait_final(j.id, timeout=240) for j in (long_job, crash_job, broken_job)}
        rep = run.check(list(views))
        with run.client.db.session() as s:
            failed = {(r.job_id, r.custom_id): (r.error, r.attempts) for r in s.execute(
                select(Item.job_id, Item.custom_id, Item.error, Item.attempts).where(Item.status == "failed"))}
        rep.expect({c for j, c in failed if j == long_job.id} == {"long3", "long11", "long17"},
                   "the long prompts, and only they, fail in their job")
        rep.expect({c for j, c in failed if j == crash_job.id} == {"crash"}, "only the crashing item fails")
        crash = failed.get((crash_job.id, "crash"))
        rep.expect(crash is not None and crash[1] <= 4 and "attempts" in crash[0],
                   f"the crashing item gave up after bounded attempts: {crash}")
        rep.expect(len([1 for j, _ in failed if j == broken_job.id]) == 8
                   and all("model load failed" in e for (j, _), (e, _a) in failed.items() if j == broken_job.id),
                   "every item of the broken model fails with the load error")
        return rep


def out_of_memory(env: FaultEnv, full: bool) -> Report:
    """10. A backend out of memory above two items, micro-batches of eight: split and retried, and the
    outputs are byte-identical to an unsplit run on the real backend."""
    with env.run("oom-split", AIGC_MICRO_BATCH_SIZE="8") as run:
        run.register_model()
        run.register_model("tiny-oom", backend="oom-text")
        run.start_scheduler()
        run.start_worker(app="tests.faults.backends_app")
        oom = run.client.submit("text", model="tiny-oom", items=prompts(24), seed=10)
        ref = run.client.submit("text", model="tiny", items=prompts(24), seed=10)
        run.wait_final(oom.id)
        run.wait_final(ref.id)
        rep = run.check([oom.id, ref.id])
        got = {r.custom_id: r.sha256 for r in run.client.results(oom.id)}
        want = {r.custom_id: r.sha256 for r in run.client.results(ref.id)}
        rep.expect(len(got) == 24 and got == want, "outputs after the split differ from the unsplit run")
        rep.expect("out of memory at a batch of 8" in run.worker_logs(), "no split was logged")
        return rep


def idempotent_submits(env: FaultEnv, full: bool) -> Report:
    """11. Ten concurrent submits with one idempotency key make one job; another payload is refused."""
    from aigc_core.errors import IdempotencyConflict

    with env.run("idempotency") as run:
        _started(run)
        ids, errors, gate = [], [], threading.Barrier(10)

        def submit(c) -> None:
            gate.wait()
            try:
                ids.append(c.submit("text", model="tiny", items=prompts(), seed=11, idempotency_key="nightly").id)
            except Exception as e:
                errors.append(repr(e))

        threads = [threading.Thread(target=submit, args=(run.new_client(),)) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        conflict = None
        try:
            run.client.submit("text", model="tiny", items=prompts()[:5], seed=11, idempotency_key="nightly")
        except IdempotencyConflict as e:
            conflict = str(e)
        view = run.wait_final(ids[0]) if ids else None
        rep = run.check(sorted(set(ids)))
        rep.expect(not errors and len(ids) == 10 and len(set(ids)) == 1, f"{len(set(ids))} jobs, errors {errors}")
        rep.expect(conflict is not None and "different payload" in conflict, "no clear conflict error")
        rep.expect(view is not None and view.status.value == "succeeded", "the job did not succeed")
        return rep


def redelivered_while_running(env: FaultEnv, full: bool) -> Report:
    """12. A visibility timeout (2 s) shorter than a chunk: Redis hands the message to a second worker
    while the first still runs it. The second claims nothing the first holds under its lease."""
    with env.run("visibility", AIGC_VISIBILITY_TIMEOUT_S="2", AIGC_MICRO_BATCH_SIZE="1") as run:
        run.register_model(max_new_tokens=96)
        run.start_scheduler()
        run.start_worker()
        run.start_worker()
        job = run.client.submit("text", model="tiny", items=prompts(32), seed=12)
        view = run.wait_final(job.id, timeout=300)
        rep = run.check([job.id])
        rep.expect(view.status.value == "succeeded", f"job ended {view.status.value}")
        again = redeliveries(run.worker_logs())
        rep.notes.append(f"{again} messages delivered a second time while their chunk ran")
        if full:
            rep.expect(again > 0, "no message was redelivered: the scenario did not happen")
        return rep


def redeliveries(logs: str) -> int:
    """Messages received more than once (the same task id), from the workers' logs."""
    import re
    from collections import Counter

    ids = Counter(re.findall(r"Task worker\.run_chunk\[([0-9a-f-]+)\] received", logs))
    return sum(n - 1 for n in ids.values())


def cancel_mid_job(env: FaultEnv, full: bool) -> Report:
    """13. Cancel mid-job: nothing new starts, finished outputs stay, the job ends cancelled."""
    from aigc_core.schema import Item

    with env.run("cancel") as run:
        _started(run)
        job = run.client.submit("text", model="tiny", items=prompts(), seed=13)
        run.wait_until(mid_job(run, job.id, done=8), 120, "mid-job")
        cancelled_at = time.time()
        run.client.cancel(job.id)
        view = run.wait_final(job.id)
        rep = run.check([job.id])
        with run.client.db.session() as s:
            late = s.scalar(select(text("count(*)")).select_from(Item).where(
                Item.job_id == job.id, Item.started_at > _ts(cancelled_at + 0.5)))
        rep.expect(view.status.value == "cancelled", f"job ended {view.status.value}")
        rep.expect(late == 0, f"{late} items started after the cancel")
        rep.expect(rep.cancelled > 0 and rep.succeeded >= 8, "nothing was cancelled, or finished work was dropped")
        return rep


def _worker_id(w: WorkerProc) -> str:
    import socket

    return f"{socket.gethostname()}:{w.proc.pid}"  # the solo pool runs tasks in the main process


def _items_of(run: Run, job_id: str, worker: str, status: str = "running") -> list[int]:
    from aigc_core.schema import Item

    with run.client.db.session() as s:
        return list(s.scalars(select(Item.id).where(Item.job_id == job_id, Item.worker == worker,
                                                    Item.status == status)))


def _settled(w: WorkerProc) -> bool:
    """Every message the worker received has ended (succeeded, retried or raised)."""
    log = w.log()
    ended = sum(log.count(s) for s in ("] succeeded in", "] retry:", "] raised"))
    return log.count("] received") <= ended


def _zombie(env: FaultEnv, name: str, seed: int, stall: Callable[[WorkerProc, TcpProxy], None],
            resume: Callable[[WorkerProc, TcpProxy], None]) -> tuple[Report, TcpProxy, dict]:
    """Workers A and B; A stalls while it holds items (``stall``), its leases run out, B takes the items
    over and commits them, then A resumes (``resume``) and its late writes land. Every committed
    object and sidecar must still be the one its row names, and A's writes must be gone."""
    from urllib.parse import urlsplit

    from tests.faults.servers import TcpProxy

    endpoint = urlsplit(env.s3.endpoint)
    own = TcpProxy((endpoint.hostname, endpoint.port))  # A's own way to S3, so it can be held alone
    seen: dict = {}
    try:
        with env.run(name, AIGC_LEASE_S="6") as run:
            run.register_model()
            run.start_scheduler()
            a = run.start_worker(env={"AIGC_S3_ENDPOINT_URL": own.url, "AIGC_CACHE_DIR": str(run.dir / "cache-a")})
            b = run.start_worker()
            job = run.client.submit("text", model="tiny", items=prompts(), seed=seed)
            # A has its model (it committed something) and holds items now.
            run.wait_until(lambda: bool(_items_of(run, job.id, _worker_id(a), "succeeded")
                                        and _items_of(run, job.id, _worker_id(a))), 120, "A mid-chunk")
            taken = _items_of(run, job.id, _worker_id(a))
            stall(a, own)
            view = run.wait_final(job.id, timeout=180)  # B took A's items over once their leases expired
            time.sleep(3)  # A stays stalled past B's commit by more than S3's one-second timestamps
            resume(a, own)
            run.wait_until(lambda: _settled(a), 90, "A's chunk ended")
            from aigc_core.schema import Item

            with run.client.db.session() as s:
                seen["by_b"] = s.scalar(select(text("count(*)")).select_from(Item).where(
                    Item.id.in_(taken), Item.worker == _worker_id(b), Item.status == "succeeded"))
            rep = run.check([job.id])
            rep.expect(view.status.value == "succeeded", f"job ended {view.status.value}")
            rep.expect(seen["by_b"] == len(taken), f"B committed {seen['by_b']} of the {len(taken)} items A held")
            rep.expect(rep.orphans == 0, f"{rep.orphans} objects of the zombie's left in the bucket")
            return rep, own, seen
    finally:
        own.cut()


def zombie_held_put(env: FaultEnv, full: bool) -> Report:
    """14. Worker A's S3 requests are held in the network past its lease (6 s); B takes A's items over
    and commits; then A's held PUTs go through. They land on A's own keys, not on B's objects."""
    rep, own, _ = _zombie(env, "zombie-held-put", 14, lambda a, p: p.hold(), lambda a, p: p.release())
    rep.expect(own.late_bytes > 0, "A sent nothing after the release: the held PUT never landed")
    rep.notes.append(f"{own.late_bytes} bytes of A's held requests reached S3 after B's commit")
    return rep


def zombie_sigstop(env: FaultEnv, full: bool) -> Report:
    """15. Worker A is frozen (SIGSTOP) while it holds items, past its lease; B commits them; A is
    thawed (SIGCONT) and goes on where it stopped, mid-PUT or not."""
    return _zombie(env, "zombie-sigstop", 15, lambda a, p: os.killpg(a.proc.pid, signal.SIGSTOP),
                   lambda a, p: os.killpg(a.proc.pid, signal.SIGCONT))[0]


def killed_during_s3_outage(env: FaultEnv, full: bool) -> Report:
    """16. S3 goes down, the worker's chunks wait in Celery's retry countdown, and the whole worker is
    SIGKILLed holding those countdown messages (unacked in Redis until the one-hour visibility
    timeout). A new worker starts; S3 comes back. The reconciler must see that no live worker holds
    them and publish them again: every item finishes within about a lease of S3's return."""
    outage = 20 if full else 12
    # The defaults of a deployment: an hour before Redis gives an unacked message back, and an hour
    # before the reconciler re-sends a chunk the broker claims to hold.
    with env.run("kill-in-s3-outage", AIGC_VISIBILITY_TIMEOUT_S="3600", AIGC_REPUBLISH_AFTER_S="3600") as run:
        w = _started(run, pool="prefork", concurrency=1)
        job = run.client.submit("text", model="tiny", items=prompts(96), seed=16)
        run.wait_until(mid_job(run, job.id), 120, "mid-job")
        env.proxy.cut()
        cut_at = time.time()
        run.wait_until(lambda: "retry: Retry in" in w.log(), 60, "a retry countdown")
        # Kill when the worker holds (in kombu's unacked hash) a message for a chunk none of whose
        # items it has claimed: a countdown or prefetched message, which dies with it.
        run.wait_until(lambda: _holds_unstarted_chunk(run, env.redis.url()), 30, "a held, unstarted chunk")
        w.kill()
        run.start_worker()
        time.sleep(max(0.0, outage - (time.time() - cut_at)))
        env.proxy.restore()
        back_at = time.time()
        view = run.wait_final(job.id, timeout=150)
        rep = run.check([job.id], fault_cleared_at=back_at)
        from aigc_core.schema import Item

        with run.client.db.session() as s:
            last = s.scalar(select(text("max(finished_at)")).select_from(Item).where(Item.job_id == job.id))
        waited = last.timestamp() - back_at
        rep.expect(view.status.value == "succeeded", f"job ended {view.status.value}")
        rep.expect(rep.succeeded == 96, "not every item succeeded")
        # One lease (8 s) for the dead worker's items, plus a retry countdown that may still run on
        # the new worker (up to 60 s, retry_backoff_max), plus the generation itself.
        rep.expect(waited < 8 + 60 + 20, f"the last item finished {waited:.0f} s after S3 came back")
        rep.notes.append(f"outage {outage} s; last item {waited:.1f} s after S3 came back")
        return rep


def _holds_unstarted_chunk(run: Run, redis_url: str) -> bool:
    from aigc_core.schema import Item
    from scheduler.ops.broker import chunk_of

    for raw in _redis(redis_url).hvals("unacked"):
        c = chunk_of(raw, unacked=True)
        if c is None:
            continue
        with run.client.db.session() as s:
            states = set(s.scalars(select(Item.status).where(Item.job_id == c[0], Item.chunk_no == c[1])))
        if states == {"pending"}:
            return True
    return False


def _ts(t: float):
    from datetime import datetime

    return datetime.fromtimestamp(t, UTC)


SCENARIOS: dict[str, Callable[[FaultEnv, bool], Report]] = {
    "kill-worker-child": kill_worker_child,
    "kill-whole-worker": kill_whole_worker,
    "warm-shutdown": warm_shutdown,
    "redis-restart-aof": redis_restart,
    "redis-restarted-empty": redis_restarted_empty,
    "submit-while-redis-down": submit_while_redis_down,
    "s3-outage": s3_outage,
    "pg-connections-killed": database_connections_killed,
    "poison-items-and-model": poison,
    "out-of-memory-split": out_of_memory,
    "idempotent-submits": idempotent_submits,
    "redelivered-while-running": redelivered_while_running,
    "cancel-mid-job": cancel_mid_job,
    "zombie-held-put": zombie_held_put,
    "zombie-sigstop": zombie_sigstop,
    "killed-during-s3-outage": killed_during_s3_outage,
}
FAST = ("kill-worker-child", "redis-restarted-empty", "s3-outage", "out-of-memory-split", "cancel-mid-job",
        "zombie-held-put", "killed-during-s3-outage")
