"""Shared fixtures: tiny real models, SQLite and PostgreSQL databases, Redis, a real S3 server."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from aigc_core.settings import Settings
from tests.support.models import build_tiny_text_model

PG_ADMIN_URL = os.environ.get("AIGC_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("AIGC_TEST_REDIS_URL", "redis://127.0.0.1:6379")
# A database of Redis's 16 per test session (tests flush it), so two suites running at once on one
# Redis (a developer's and CI's) rarely share one; AIGC_TEST_REDIS_DB fixes it.
REDIS_DB = int(os.environ.get("AIGC_TEST_REDIS_DB", 2 + os.getpid() % 14))


@pytest.fixture(autouse=True, scope="session")
def _no_os_exit_in_the_test_process():
    """``os._exit`` in the pytest process would end the run at once with that code, 0 included: a
    truncated run that looks green. Here it raises instead; a forked child still exits for real."""
    real, pid = os._exit, os.getpid()

    def guarded(code: int) -> None:
        if os.getpid() == pid:
            raise RuntimeError(f"os._exit({code}) called in the pytest process: it would end the test run here")
        real(code)

    os._exit = guarded  # type: ignore[assignment]
    yield
    os._exit = real


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: tiny models gain nothing from threads, and on a shared 2-core
    machine OpenMP threads spin-waiting for each other make them crawl."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_text_model(tmp_path_factory) -> Path:
    return build_tiny_text_model(tmp_path_factory.mktemp("models") / "tiny-gpt2")


@pytest.fixture
def sqlite_settings(tmp_path) -> Settings:
    return Settings(database_url=f"sqlite:///{tmp_path}/aigc.db", storage_url=f"file://{tmp_path}/data",
                    cache_dir=tmp_path / "cache", broker_url=None, chunk_size=4, micro_batch_size=2)


@pytest.fixture
def client(sqlite_settings, tiny_text_model):
    """An embedded client with the tiny model registered as ``tiny``."""
    from scheduler import Client

    c = Client(sqlite_settings)
    c.register_model("tiny", "text", tiny_text_model.as_uri(), defaults={"max_new_tokens": 8})
    return c


# ---- real servers (integration) -------------------------------------------------------------------

@pytest.fixture(scope="session")
def pg_url():
    """A fresh PostgreSQL database for this test session, migrated with Alembic."""
    from sqlalchemy import create_engine, text

    from aigc_core.db import Database, normalize_url

    name = f"aigc_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(normalize_url(PG_ADMIN_URL), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as e:
        pytest.fail(f"PostgreSQL at {PG_ADMIN_URL} is not reachable: {e}")
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    Database(url).upgrade()
    yield url
    from aigc_core.db import database

    database.cache_clear()
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def pg_clean(pg_url):
    """Empty tables before a test that shares the session database."""
    from sqlalchemy import text

    from aigc_core.db import database

    with database(pg_url).engine.begin() as c:
        c.execute(text("TRUNCATE artifacts, job_events, items, chunks, jobs, models RESTART IDENTITY CASCADE"))
    return pg_url


@pytest.fixture
def redis_url():
    """A Redis database of its own, flushed before and after."""
    import redis

    url = f"{REDIS_URL}/{REDIS_DB}"
    r = redis.Redis.from_url(url)
    try:
        r.flushdb()
    except redis.ConnectionError as e:
        pytest.fail(f"Redis at {REDIS_URL} is not reachable: {e}")
    yield url
    r.flushdb()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    from tests.support.s3server import start_s3_server

    server = start_s3_server(tmp_path_factory.mktemp("seaweed"))
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch) -> str:
    """A new bucket per test; credentials in the environment, as boto3's default chain reads them."""
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    name = f"aigc-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(name)
    return name
