"""Security against the real servers: JSON messages with ids only (a pickled one is refused by a real
worker), Redis with a password and TLS, no secret in any log or output, short-lived GET-only presigned URLs."""

from __future__ import annotations

import os
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from urllib.parse import parse_qs, urlsplit, urlunsplit

import pytest
from celery import Celery

from aigc_core.errors import SpecError
from aigc_core.schema import JobStatus
from aigc_core.settings import Settings
from aigc_core.storage import S3Store
from scheduler.dispatch import CeleryPublisher
from scheduler.ops.overview import BrokerProbe
from tests.support.redisserver import start_redis
from tests.support.s3server import SECRET_KEY
from tests.unit.test_cli import AIGC

pytestmark = pytest.mark.integration


def test_a_pickled_message_is_refused_and_runs_nothing(deploy_client, deploy_env, workers):
    from unittest import mock

    c = deploy_client
    with mock.patch.object(c.runner, "dispatch", lambda client, job_id: None):  # keep it in the outbox
        job = c.submit("text", model="tiny", items=["Headline: x\n\n"])
    evil = Celery("evil", broker=deploy_env["AIGC_BROKER_URL"])
    evil.conf.update(task_serializer="pickle", accept_content=["pickle", "json"])
    evil.send_task("worker.run_chunk", args=[job.id, 0], queue="text", serializer="pickle")
    w = workers(pool="solo")
    deadline = time.monotonic() + 30
    while "pickle" not in w.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "Refusing to deserialize untrusted content of type pickle" in w.log()
    time.sleep(1)
    view = c.status(job.id)
    assert view.status == JobStatus.queued and view.counts["pending"] == 1  # nothing ran


# ---- messages: ids only -----------------------------------------------------------------------------

def test_a_published_message_carries_ids_only_no_prompt_params_or_metadata(deploy_client, redis_url):
    import base64
    import json

    import redis

    secret_prompt, secret_meta = "Headline: PROMPT-SENTINEL-5d1e\n\n", "META-SENTINEL-a7c0"
    job = deploy_client.submit("text", model="tiny", items=[secret_prompt] * 10, metadata={"note": secret_meta},
                               params={"max_new_tokens": 7})
    raw = redis.Redis.from_url(redis_url).lrange("text", 0, -1)
    assert len(raw) == 2  # 10 items in chunks of 8
    chunks = []
    for message in raw:
        assert b"SENTINEL" not in message and b"max_new_tokens" not in message
        envelope = json.loads(message)
        assert envelope["content-type"] == "application/json"
        args, kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
        assert kwargs == {} and args[0] == job.id and isinstance(args[1], int) and len(args) == 2
        assert envelope["headers"]["task"] == "worker.run_chunk"
        # what Flower's task list shows: ids only, like the arguments
        assert envelope["headers"]["argsrepr"] == f"text job {job.id[:8]} chunk {args[1]}"
        chunks.append(args[1])
    assert sorted(chunks) == [0, 1]


# ---- Redis with a password, and with TLS ------------------------------------------------------------

REDIS_SECRET = "redis-SECRET-7f3a9c"


@pytest.fixture
def redis_pw(tmp_path):
    server = start_redis(tmp_path / "redis-pw", REDIS_SECRET)
    yield server
    server.stop()


@pytest.fixture
def redis_tls(tmp_path):
    server = start_redis(tmp_path / "redis-tls", REDIS_SECRET, tls=True)
    yield server
    server.stop()


def test_a_password_protected_redis_takes_messages_with_the_password_and_refuses_them_without(redis_pw):
    CeleryPublisher(redis_pw.url())("text", "a" * 32, 0)
    assert redis_pw.client().llen("text") == 1
    assert BrokerProbe(redis_pw.url()).queue_depths(["text"]) == {"text": 1}

    with pytest.raises(Exception, match="Authentication required"):
        CeleryPublisher(redis_pw.url(password=""))("text", "a" * 32, 1)
    wrong = "redis-SECRET-wrong-0b9d"
    with pytest.raises(Exception, match="invalid username-password pair") as e:
        CeleryPublisher(redis_pw.url(password=wrong))("text", "a" * 32, 2)
    assert wrong not in str(e.value) and REDIS_SECRET not in str(e.value)
    assert redis_pw.client().llen("text") == 1  # nothing got in without the password


def test_a_rediss_broker_verifies_the_server_certificate_against_the_configured_ca(redis_tls, monkeypatch):
    monkeypatch.setenv("AIGC_BROKER_URL", redis_tls.url(db=1))
    unverified = Settings()
    assert unverified.broker_ssl() == {"ssl_cert_reqs": ssl.CERT_REQUIRED}  # not kombu's CERT_NONE default
    with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
        CeleryPublisher(unverified.broker_url, ssl=unverified.broker_ssl())("text", "b" * 32, 0)

    # kombu pools connections by URL, not by TLS options: db 2 is a connection of its own
    monkeypatch.setenv("AIGC_BROKER_URL", redis_tls.url(db=2))
    monkeypatch.setenv("AIGC_BROKER_SSL_CA_CERTS", str(redis_tls.ca_file))
    s = Settings()
    CeleryPublisher(s.broker_url, ssl=s.broker_ssl())("text", "b" * 32, 0)
    assert BrokerProbe(s.broker_url, ssl=s.broker_ssl()).queue_depths(["text"]) == {"text": 1}
    assert redis_tls.client(db=2).llen("text") == 1
    from worker.app import make_app

    assert make_app(s).conf.broker_use_ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED,
                                               "ssl_ca_certs": str(redis_tls.ca_file)}


# ---- secrets never in logs or output ----------------------------------------------------------------

PG_SECRET = "pg-SECRET-41b2d8"
FLOWER_SECRET = "flower-SECRET-99e1"
S3_WRONG_SECRET = "aws-SECRET-wrong-3c6f"
REDIS_WRONG_SECRET = "redis-SECRET-wrong-0b9d"


def _with_password(url: str, password: str, port: int | None = None) -> str:
    parts = urlsplit(url)
    netloc = f"{parts.username}:{password}@{parts.hostname}:{port or parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def test_secrets_never_reach_logs_or_command_output_at_debug_level(deploy_env, deploy_client, redis_tls, workers,
                                                                   tmp_path):
    """A job over TLS Redis with a password, PostgreSQL with a password and S3, everything at DEBUG, and
    commands that fail on a wrong password or key: no secret in any log line or output."""
    s3_secret = SECRET_KEY
    env = {**deploy_env, "AIGC_BROKER_URL": redis_tls.url(), "AIGC_BROKER_SSL_CA_CERTS": str(redis_tls.ca_file),
           "AIGC_DATABASE_URL": _with_password(deploy_env["AIGC_DATABASE_URL"], PG_SECRET),
           "AIGC_LOG_LEVEL": "DEBUG", "AIGC_FLOWER_BASIC_AUTH": f"admin:{FLOWER_SECRET}"}
    assert env["AWS_SECRET_ACCESS_KEY"] == s3_secret
    w = workers(pool="solo", env=env, loglevel="DEBUG")

    def aigc(*args, **overrides):
        r = subprocess.run([AIGC, *map(str, args)], env={**os.environ, **env, **overrides}, capture_output=True,
                           text=True, timeout=180, cwd=tmp_path)
        runs.append((args, r))
        return r

    runs: list = []
    items = tmp_path / "items.jsonl"
    items.write_text("".join(f'{{"prompt": "Headline: Storm {i}\\n\\n"}}\n' for i in range(3)))
    r = aigc("submit", "--items", items, "--model", "tiny", "--param", "max_new_tokens=4", "--wait")
    assert r.returncode == 0, r.stderr[-3000:]
    job_id = r.stdout.split()[0]
    assert "succeeded" in r.stdout
    for args in (("status", job_id), ("status",), ("results", job_id), ("models", "list"),
                 ("results", job_id, "--download", tmp_path / "out")):
        r = aigc(*args)
        assert r.returncode == 0, (args, r.stderr[-3000:])
        assert "not read" not in r.stdout and "not asked" not in r.stdout, r.stdout  # TLS options reach the probe

    # the same commands failing: a wrong Redis password, a wrong S3 key, a database that is down
    r = aigc("status", AIGC_BROKER_URL=redis_tls.url(password=REDIS_WRONG_SECRET))
    assert r.returncode == 0 and "invalid username-password pair" in r.stdout, r.stdout
    r = aigc("results", job_id, "--download", tmp_path / "out2", AWS_SECRET_ACCESS_KEY=S3_WRONG_SECRET)
    assert r.returncode == 1 and "SignatureDoesNotMatch" in r.stderr, r.stderr[-2000:]
    r = aigc("status", job_id, AIGC_DATABASE_URL=_with_password(deploy_env["AIGC_DATABASE_URL"], PG_SECRET, port=1))
    assert r.returncode == 1 and "port 1 failed" in r.stderr, r.stderr[-2000:]
    r = aigc("submit", "--items", items, "--model", "tiny", AIGC_BROKER_URL=redis_tls.url(password=REDIS_WRONG_SECRET))
    assert r.returncode == 0 and "publish failed" in r.stderr, r.stderr[-2000:]  # kept in the outbox

    w.stop()
    text = w.log() + "".join(r.stdout + r.stderr for _, r in runs)
    assert " DEBUG" in w.log() and "DEBUG" in runs[0][1].stderr  # the debug level really was on
    for secret in (REDIS_SECRET, REDIS_WRONG_SECRET, PG_SECRET, s3_secret, S3_WRONG_SECRET, FLOWER_SECRET):
        leaks = [line for line in text.splitlines() if secret in line]
        assert not leaks, f"{secret} in the output:\n" + "\n".join(leaks[:5])


# ---- presigned download URLs ------------------------------------------------------------------------

def _http(url: str, method: str = "GET", data: bytes | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, method=method), timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_a_presigned_url_is_get_only_for_one_object_and_short_lived(s3_server, s3_bucket):
    store = S3Store(s3_bucket, "outputs", endpoint_url=s3_server.endpoint)
    key = "jobs/0123456789abcdef0123456789abcdef/items/000000.txt"
    store.put(key, b"the article")
    url = store.presign_get(key)
    query = parse_qs(urlsplit(url).query)
    assert query["X-Amz-Expires"] == ["900"] and query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert SECRET_KEY not in url

    assert _http(url) == (200, b"the article")
    assert _http(url, "PUT", b"overwritten")[0] == 403
    assert _http(url, "DELETE")[0] == 403
    assert _http(url.replace("000000.txt", "000001.txt"))[0] == 403  # the signature covers the key
    assert store.get(key) == b"the article"

    short = store.presign_get(key, expires_s=1)
    time.sleep(2.5)
    status, body = _http(short)
    assert status == 403 and b"expired" in body
    for bad in (0, -5, 86_401, 7 * 24 * 3600):
        with pytest.raises(SpecError, match="presigned URL expiry"):
            store.presign_get(key, expires_s=bad)
