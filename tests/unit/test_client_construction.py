"""Client() is cheap and explicit: no I/O until a call needs it, and how jobs run is an injected
runner. The worker's modules import one way (pipeline -> finetune -> store), with no circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from scheduler import Client
from scheduler.runners import CeleryRunner, InProcessRunner

ROOT = Path(__file__).resolve().parents[2]


def test_construction_touches_no_service():
    c = Client(database_url="postgresql://postgres@127.0.0.1:1/nowhere", storage_url="s3://no-bucket/x",
               broker_url=None)
    assert isinstance(c.runner, InProcessRunner) and c.publish is None
    with pytest.raises(OperationalError):
        c.jobs()  # the first call that needs the database is the one that meets it (the CLI words it)


def test_a_broker_in_the_settings_picks_celery(sqlite_settings):
    c = Client(sqlite_settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"}))
    assert isinstance(c.runner, CeleryRunner) and c.publish is c.runner.publisher


class RecordingRunner:
    publisher = None

    def __init__(self):
        self.calls: list[tuple[str, str]] = []

    def dispatch(self, client, job_id):
        self.calls.append(("dispatch", job_id))

    def drive(self, client, job_id, on_chunk):
        self.calls.append(("drive", job_id))
        client.cancel(job_id)  # a runner of its own: here, one that gives up


def test_an_injected_runner_is_what_submit_and_wait_use(sqlite_settings):
    runner = RecordingRunner()
    c = Client(sqlite_settings, runner=runner)
    job = c.submit("audio", model="espeak-en", items=["one", "two"])
    view = c.wait(job.id, timeout=30)
    assert runner.calls == [("dispatch", job.id), ("drive", job.id)]
    assert view.status.value == "cancelled"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


@pytest.mark.parametrize(("module", "never"), [
    ("worker/finetune.py", "worker.pipeline"),
    ("worker/store.py", "worker.pipeline"),
    ("worker/chunk.py", "worker.pipeline"),
    ("scheduler/cron/schedules.py", "scheduler.cli"),
])
def test_imports_point_one_way(module, never):
    assert not any(m == never or m.startswith(never + ".") for m in _imports(ROOT / module))
