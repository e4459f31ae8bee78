"""Ops: JSON logs with job fields, the ``aigc status`` overview, the Prometheus collectors, ``aigc flower``."""

from __future__ import annotations

import io
import json
import logging
import os

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from sqlalchemy import func, select
from typer.testing import CliRunner

from aigc_core.errors import SpecError, StorageError
from aigc_core.logs import ContextFilter, JsonFormatter, instrument_handler, log_context
from aigc_core.schema import Chunk, ChunkStatus, Item, ItemStatus, Job
from scheduler.cli.ops import render_overview
from scheduler.ops.metrics import make_registry
from scheduler.ops.overview import gather_overview
from tests.unit.test_pipeline import FakeGen, runtime, submit
from worker import metrics as wm
from worker.pipeline import run_chunk


@pytest.fixture
def records():
    """JSON lines from every logger, as the worker writes them."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    instrument_handler(handler, json_lines=True)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield lambda: [json.loads(line) for line in buf.getvalue().splitlines()]
    root.removeHandler(handler)
    root.setLevel(old_level)


class FakeBroker:
    def __init__(self, depths=None, active=None, fail=False):
        self.depths, self._active, self.fail = depths or {}, active or {}, fail

    def queue_depths(self, queues):
        if self.fail:
            raise ConnectionError("redis is away")
        return {q: self.depths.get(q, 0) for q in queues}

    def unacked(self):
        return 1

    def active(self):
        if self.fail:
            raise ConnectionError("redis is away")
        return self._active


# ---- structured logs ----------------------------------------------------------------------------

def test_json_lines_inside_a_log_context_carry_job_id_chunk_and_item(records):
    log = logging.getLogger("aigc.test")
    with log_context(job_id="j1", chunk=3):
        log.info("claimed %d items", 4)
        log.warning("item failed", extra={"item": 7})
    log.info("not about a job")
    lines = records()
    assert [(x["message"], x.get("job_id"), x.get("chunk"), x.get("item")) for x in lines] == [
        ("claimed 4 items", "j1", 3, None), ("item failed", "j1", 3, 7), ("not about a job", None, None, None)]
    assert all(x["level"] and x["logger"] == "aigc.test" and x["ts"].endswith("+00:00") for x in lines)


def test_celery_lines_about_a_chunk_task_carry_its_ids():
    rec = logging.LogRecord("celery.worker.strategy", logging.INFO, __file__, 1, "Task %(name)s[%(id)s] received",
                            None, None)
    rec.data = {"id": "t1", "name": "worker.run_chunk", "args": "['3f2a', 4]"}
    ContextFilter().filter(rec)
    doc = json.loads(JsonFormatter().format(rec))
    assert (doc["job_id"], doc["chunk"]) == ("3f2a", 4)


def test_every_pipeline_line_names_its_job_and_the_failed_item_names_itself(client, records):
    job = submit(client, ["one", "two BOOM", "three"])
    run_chunk(runtime(client, FakeGen()), job.id, 0)
    lines = [x for x in records() if x["logger"].startswith("aigc")]
    assert lines and all(x["job_id"] == job.id and x["chunk"] == 0 for x in lines), lines
    assert [x["item"] for x in lines if "failed" in x["message"]] == [1]


def test_text_lines_end_with_the_job_fields():
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    instrument_handler(handler, json_lines=False)
    log = logging.getLogger("aigc.text-test")
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO)
    with log_context(job_id="j9", chunk=2):
        log.info("hello")
    assert buf.getvalue().rstrip().endswith("aigc.text-test: hello  job_id=j9 chunk=2")


# ---- aigc status --------------------------------------------------------------------------------

def _busy_db(client):
    """A finished job with a failure, and a job with 1 of 3 chunks done: something in every section."""
    done = submit(client, ["a", "b BOOM", "c", "d"])
    rt = runtime(client, FakeGen())
    run_chunk(rt, done.id, 0)
    half = submit(client, [f"p{i}" for i in range(12)])
    run_chunk(rt, half.id, 0)
    return done, half, rt


def test_overview_shows_queues_workers_jobs_in_flight_and_last_failures(client):
    done, half, rt = _busy_db(client)
    broker = FakeBroker({"text": 5}, {"w1@gpu-0": [{"name": "worker.run_chunk", "args": [half.id, 1]}]})
    ov = gather_overview(client.db, broker, latest=client.jobs(10))
    console = Console(record=True, width=160)
    console.print(render_overview(ov, broker_configured=True))
    screen = console.export_text()
    text_row = [line.split() for line in screen.splitlines() if line.split()[:1] == ["text"]]
    assert text_row == [["text", "5", "4", "0"]]  # waiting 5; run_chunk alone leaves the 4 outbox rows pending
    assert "w1@gpu-0" in screen and f"{half.id}/1" in screen and rt.worker_id in screen
    assert half.id in screen.split("Jobs in flight")[1].split("Last failures")[0]
    assert "4/12" in screen
    failures = screen.split("Last failures")[1]
    assert done.id in failures and "the backend exploded" in failures
    assert "Latest jobs" in screen
    assert [v.id for v in ov.in_flight] == [half.id]


def test_overview_without_a_reachable_broker_still_shows_the_database(client):
    _busy_db(client)
    ov = gather_overview(client.db, FakeBroker(fail=True), latest=[])
    assert any("redis is away" in p for p in ov.problems)
    assert ov.items["succeeded"] == 7 and all(q.depth is None for q in ov.queues)


def test_status_with_no_job_prints_the_overview(client, monkeypatch):
    from scheduler.cli import root as cli

    _busy_db(client)
    monkeypatch.setattr(cli, "_client", lambda: client)
    res = CliRunner().invoke(cli.app, ["status"], env={"COLUMNS": "160"})
    assert res.exit_code == 0, res.output
    for section in ("Queues", "Workers", "Jobs in flight", "Last failures", "Latest jobs"):
        assert section in res.output


# ---- Prometheus ---------------------------------------------------------------------------------

def _samples(registry) -> dict[tuple[str, tuple], float]:
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_collector_series_match_the_database_and_the_broker(client):
    _done, half, _ = _busy_db(client)
    client.cancel(half.id)
    samples = _samples(make_registry(client.db, FakeBroker({"text": 3, "image": 1}), process=False))
    with client.db.session() as s:
        items = {st.value: n for st, n in s.execute(select(Item.status, func.count()).group_by(Item.status))}
        jobs = {st.value: n for st, n in s.execute(select(Job.status, func.count()).group_by(Job.status))}
        outbox = s.scalar(select(func.count()).select_from(Chunk).where(Chunk.status == ChunkStatus.pending))
    assert items["cancelled"] == 8 and jobs["cancelled"] == 1
    for st in ItemStatus:
        assert samples[("aigc_items", (("state", st.value),))] == items.get(st.value, 0)
    for st, n in jobs.items():
        assert samples[("aigc_jobs", (("state", st),))] == n
    assert samples[("aigc_queue_depth", (("queue", "text"),))] == 3
    assert samples[("aigc_queue_depth", (("queue", "image"),))] == 1
    assert samples[("aigc_outbox_chunks", (("queue", "text"), ("state", "pending")))] == outbox > 0
    for st in ("succeeded", "failed", "cancelled"):  # everything here finished within the last minute
        assert samples[("aigc_items_per_second", (("state", st),))] == pytest.approx(items[st] / 60)
    assert samples[("aigc_metrics_source_up", (("source", "database"),))] == 1
    assert samples[("aigc_metrics_source_up", (("source", "broker"),))] == 1
    assert samples[("aigc_broker_unacked_messages", ())] == 1


def test_a_scrape_reports_a_source_down_instead_of_failing(client):
    samples = _samples(make_registry(client.db, FakeBroker(fail=True), process=False))
    assert samples[("aigc_metrics_source_up", (("source", "broker"),))] == 0
    assert samples[("aigc_metrics_source_up", (("source", "database"),))] == 1
    assert not any(name == "aigc_queue_depth" for name, _ in samples)


def test_worker_metrics_count_loads_pinned_models_generation_and_storage_errors(client):
    def value(name, **labels):
        return wm.REGISTRY.get_sample_value(name, labels) or 0.0

    before = (value("aigc_worker_model_loads_total", model="tiny@1"),
              value("aigc_worker_generation_seconds_per_item_count", model="tiny@1", kind="text"),
              value("aigc_worker_items_total", model="tiny@1", state="failed"))
    job = submit(client, ["a", "b BOOM", "c", "d", "e"])
    rt = runtime(client, FakeGen())
    run_chunk(rt, job.id, 0)
    run_chunk(rt, job.id, 1)
    assert value("aigc_worker_model_loads_total", model="tiny@1") == before[0] + 1
    assert value("aigc_worker_generation_seconds_per_item_count", model="tiny@1", kind="text") == before[1] + 5
    assert value("aigc_worker_items_total", model="tiny@1", state="failed") == before[2] + 1
    assert value("aigc_worker_pinned_models") >= 1
    assert value("aigc_worker_pinned_model_bytes", model="tiny@1") >= 1  # FakeGen weighs 1 byte

    class Down:
        def put(self, *a, **k):
            raise StorageError("S3 is down")

    errors = value("aigc_worker_storage_errors_total", op="put")
    with pytest.raises(StorageError):
        wm.InstrumentedStore(Down()).put("k", b"x")
    assert value("aigc_worker_storage_errors_total", op="put") == errors + 1


def test_worker_metrics_server_takes_the_next_port_when_one_is_taken(monkeypatch):
    import prometheus_client

    taken, started = {9900}, []

    def fake_start(port, addr, registry):
        if port in taken:
            raise OSError("address in use")
        started.append(port)

    monkeypatch.setattr(prometheus_client, "start_http_server", fake_start)
    monkeypatch.setattr(wm, "_server", {})
    assert wm.start_server(9900) == 9901 and started == [9901]
    assert wm.start_server(9900) == 9901 and started == [9901]  # once per process
    assert wm.start_server(None) is None


# ---- aigc flower --------------------------------------------------------------------------------

def _flower(monkeypatch, env, *args):
    from scheduler.cli import ops as cli_ops
    from scheduler.cli import root as cli

    calls = []
    monkeypatch.setattr(cli_ops.os, "execve", lambda path, argv, e: calls.append((argv, e)))
    for k in ("AIGC_FLOWER_BASIC_AUTH", "AIGC_BROKER_URL", "FLOWER_BASIC_AUTH"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return CliRunner().invoke(cli.app, ["flower", *args]), calls


def test_flower_refuses_to_start_open_unless_asked(monkeypatch):
    res, calls = _flower(monkeypatch, {"AIGC_BROKER_URL": "redis://127.0.0.1:6379/0"})
    assert isinstance(res.exception, SpecError) and "AIGC_FLOWER_BASIC_AUTH" in str(res.exception) and not calls
    res, calls = _flower(monkeypatch, {"AIGC_BROKER_URL": "redis://127.0.0.1:6379/0"}, "--unauthenticated")
    assert res.exit_code == 0 and calls and "FLOWER_BASIC_AUTH" not in calls[0][1]


def test_flower_gets_basic_auth_through_its_environment_not_argv(monkeypatch):
    res, calls = _flower(monkeypatch, {"AIGC_BROKER_URL": "redis://127.0.0.1:6379/0",
                                       "AIGC_FLOWER_BASIC_AUTH": "ops:s3cret"}, "--port", "5556")
    assert res.exit_code == 0, res.output
    argv, env = calls[0]
    assert argv[1:] == ["-m", "celery", "-A", "worker.app", "flower", "--port=5556", "--address=0.0.0.0"]
    assert env["FLOWER_BASIC_AUTH"] == "ops:s3cret" and not any("s3cret" in a for a in argv)


def test_flower_rejects_a_malformed_auth_and_needs_a_broker(monkeypatch):
    res, _ = _flower(monkeypatch, {"AIGC_BROKER_URL": "redis://x", "AIGC_FLOWER_BASIC_AUTH": "nopassword"})
    assert isinstance(res.exception, SpecError) and "user:password" in str(res.exception)
    res, _ = _flower(monkeypatch, {"AIGC_FLOWER_BASIC_AUTH": "a:b"})
    assert isinstance(res.exception, SpecError) and "AIGC_BROKER_URL" in str(res.exception)


# ---- what Flower shows ----------------------------------------------------------------------------

def test_a_chunk_message_names_its_queue_job_and_chunk_for_flowers_task_list(monkeypatch):
    from scheduler.dispatch import CeleryPublisher

    pub = CeleryPublisher("redis://127.0.0.1:1/0")
    sent = []
    monkeypatch.setattr(pub.app, "send_task", lambda name, **kw: sent.append((name, kw)))
    pub("text", "3f2a9c1e0123456789abcdef01234567", 4)
    name, kw = sent[0]
    assert name == "worker.run_chunk" and kw["args"] == ["3f2a9c1e0123456789abcdef01234567", 4]
    assert kw["argsrepr"] == "text job 3f2a9c1e chunk 4"


def test_each_worker_process_gets_a_node_name_of_its_own(monkeypatch):
    from scheduler.cli import root as cli_root
    from worker.app import app as celery_app

    argv = []
    monkeypatch.setenv("AIGC_BROKER_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setattr(celery_app, "worker_main", lambda a: argv.append(a))
    assert CliRunner().invoke(cli_root.app, ["worker"]).exit_code == 0
    assert CliRunner().invoke(cli_root.app, ["worker", "--hostname", "gpu0@%h"]).exit_code == 0
    names = [a[a.index("--hostname") + 1] for a in argv]
    assert names[0] == f"aigc-{os.getpid()}@%h" and names[1] == "gpu0@%h"
