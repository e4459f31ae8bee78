"""Ops against the real servers: a real Flower behind basic auth, and Prometheus scrapes of real processes."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select, update

from aigc_core.schema import Chunk, ChunkStatus, Item, ItemStatus, Job

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
AIGC = str(Path(sys.executable).parent / "aigc")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, auth: tuple[str, str] | None = None, timeout: float = 5) -> tuple[int, bytes]:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_for(fn, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if (value := fn()) is not None:
                return value
        except OSError:  # not listening yet
            pass
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def spawn(tmp_path):
    """Start a process in its own group with the deployment env; every one is stopped at the end."""
    procs = []

    def start(args: list[str], env: dict[str, str], name: str) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"{name}.log"
        p = subprocess.Popen(args, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"}, cwd=ROOT,
                             stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(p)
        return p, log

    yield start
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    status, body = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}


def test_aigc_flower_answers_401_without_auth_and_lists_the_running_worker_with_it(deploy_env, workers, spawn):
    w = workers(pool="solo")
    port = free_port()
    flower, log = spawn([AIGC, "flower", f"--port={port}", "--address=127.0.0.1"],
                        deploy_env | {"AIGC_FLOWER_BASIC_AUTH": "ops:s3cret"}, "flower")
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: get(f"{url}/healthcheck")[0] == 200 or None, 30, f"flower on {port}:\n{log.read_text()}")

    assert get(f"{url}/api/workers")[0] == 401
    assert get(f"{url}/api/workers", auth=("ops", "wrong"))[0] == 401
    assert get(f"{url}/workers")[0] == 401  # the UI too, not only the API
    node = w.name.replace("%h", socket.gethostname())

    def listed():
        status, body = get(f"{url}/api/workers?refresh=1", auth=("ops", "s3cret"))
        assert status == 200, body
        return body if node.encode() in body else None

    body = wait_for(listed, 30, f"{node} in /api/workers")
    assert b'"text"' in body  # its active queue
    assert b"worker.run_chunk" in body  # registered under a readable name
    assert "s3cret" not in " ".join(subprocess.run(["ps", "-o", "args=", "-p", str(flower.pid)],
                                                   capture_output=True, text=True).stdout.split())


def test_metrics_scrape_matches_redis_llen_and_a_group_by_on_the_database(deploy_client, deploy_env, redis_url, spawn):
    c = deploy_client  # no worker runs: every chunk waits in Redis
    jobs = [c.submit("text", model="tiny", items=[{"custom_id": f"i{i}", "prompt": f"p {i}"} for i in range(n)])
            for n in (20, 5, 9)]  # chunk size 8: 3 + 1 + 2 chunks
    c.cancel(jobs[1].id)
    with c.db.session() as s:  # some finished items, as a worker would leave them
        s.execute(update(Item).where(Item.job_id == jobs[0].id, Item.index < 6)
                  .values(status=ItemStatus.succeeded, finished_at=func.now()))
        s.execute(update(Item).where(Item.job_id == jobs[0].id, Item.index == 7)
                  .values(status=ItemStatus.failed, error="boom", finished_at=func.now()))
    port = free_port()
    _, log = spawn([AIGC, "metrics", "--port", str(port), "--host", "127.0.0.1"], deploy_env, "metrics")
    samples = wait_for(lambda: scrape(port), 30, f"aigc metrics on {port}:\n{log.read_text()}")

    llen = redis.Redis.from_url(redis_url).llen("text")
    with c.db.session() as s:
        # Sent to the broker: still open (published), or its job is over (done: the cancelled one).
        published = s.scalar(select(func.count()).select_from(Chunk).where(
            Chunk.status.in_([ChunkStatus.published, ChunkStatus.done])))
        items = {st.value: n for st, n in s.execute(select(Item.status, func.count()).group_by(Item.status))}
        job_states = {st.value: n for st, n in s.execute(select(Job.status, func.count()).group_by(Job.status))}
    assert llen == published == 6
    assert samples[("aigc_queue_depth", (("queue", "text"),))] == llen
    assert samples[("aigc_queue_depth", (("queue", "image"),))] == 0
    for st in ItemStatus:
        assert samples[("aigc_items", (("state", st.value),))] == items.get(st.value, 0), st
    assert items == {"pending": 22, "succeeded": 6, "failed": 1, "cancelled": 5}
    for st, n in job_states.items():
        assert samples[("aigc_jobs", (("state", st),))] == n
    assert samples[("aigc_items_per_second", (("state", "succeeded"),))] == pytest.approx(6 / 60)
    assert samples[("aigc_metrics_source_up", (("source", "database"),))] == 1
    assert samples[("aigc_metrics_source_up", (("source", "broker"),))] == 1
    assert ("process_resident_memory_bytes", ()) in samples


def test_each_worker_process_serves_its_loads_generation_time_and_items(deploy_client, workers):
    port = free_port()
    workers(pool="solo", env={"AIGC_WORKER_METRICS_PORT": str(port)})
    samples = wait_for(lambda: scrape(port), 20, f"worker metrics on {port}")
    assert samples[("aigc_worker_pinned_models", ())] == 0
    job = deploy_client.submit("text", model="tiny", items=[{"custom_id": f"i{i}", "prompt": f"p {i}"}
                                                            for i in range(10)])
    assert deploy_client.wait(job.id, timeout=90, poll_s=0.2).status.value == "succeeded"
    samples = scrape(port)
    assert samples[("aigc_worker_model_loads_total", (("model", "tiny@1"),))] == 1
    assert samples[("aigc_worker_pinned_models", ())] == 1
    assert samples[("aigc_worker_pinned_model_bytes", (("model", "tiny@1"),))] > 0
    assert samples[("aigc_worker_generation_seconds_per_item_count", (("kind", "text"), ("model", "tiny@1")))] == 10
    assert samples[("aigc_worker_items_total", (("model", "tiny@1"), ("state", "succeeded")))] == 10
    with deploy_client.db.session() as s:
        worker = s.scalar(select(Item.worker).where(Item.job_id == job.id).limit(1))
    assert samples[("aigc_worker_info", (("worker", worker),))] == 1  # the same host:pid as items.worker
