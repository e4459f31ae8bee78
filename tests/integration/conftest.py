"""Integration fixtures: a deployment-shaped environment (PostgreSQL, Redis, S3) and worker processes."""

from __future__ import annotations

import pytest

from aigc_core.registry import dir_digest
from aigc_core.settings import Settings
from tests.support.workers import start_worker

pytestmark = pytest.mark.integration


@pytest.fixture
def deploy_env(pg_clean, redis_url, s3_bucket, s3_server, tmp_path) -> dict[str, str]:
    """AIGC_* settings as a deployment sets them, pointing at the real servers."""
    return {
        "AIGC_DATABASE_URL": pg_clean,
        "AIGC_BROKER_URL": redis_url,
        "AIGC_STORAGE_URL": f"s3://{s3_bucket}/outputs",
        "AIGC_CACHE_DIR": str(tmp_path / "worker-cache"),
        "AIGC_MICRO_BATCH_SIZE": "4",
        "AIGC_CHUNK_SIZE": "8",
        **s3_server.env,
    }


@pytest.fixture
def deploy_settings(deploy_env, monkeypatch) -> Settings:
    for k, v in deploy_env.items():
        monkeypatch.setenv(k, v)
    return Settings()


@pytest.fixture
def s3_model(tiny_text_model, s3_bucket, s3_server) -> tuple[str, str]:
    """The tiny model uploaded to S3, as a registry would point at it: (uri, digest)."""
    c = s3_server.client()
    for p in sorted(tiny_text_model.rglob("*")):
        if p.is_file():
            c.upload_file(str(p), s3_bucket, f"models/tiny/1/{p.relative_to(tiny_text_model).as_posix()}")
    return f"s3://{s3_bucket}/models/tiny/1/", dir_digest(tiny_text_model)


@pytest.fixture
def deploy_client(deploy_settings, s3_model):
    from scheduler import Client

    c = Client(deploy_settings)
    uri, digest = s3_model
    c.register_model("tiny", "text", uri, digest=digest, defaults={"max_new_tokens": 8})
    return c


@pytest.fixture
def workers(deploy_env, tmp_path):
    """Start real ``celery worker`` processes; all are stopped at the end of the test."""
    started = []

    def start(**kw):
        w = start_worker(deploy_env | kw.pop("env", {}), tmp_path, **kw)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()
