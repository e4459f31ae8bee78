"""``aigc serve --no-auth``: no login, but every visitor still gets a session so POST forms keep their
CSRF token (in-process over HTTP with TestClient; the browser tests use a server with keys)."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from aigc_core.schema import JobStatus
from aigc_core.settings import Settings


def test_without_auth_pages_open_and_a_form_still_needs_its_token(tmp_path):
    from scheduler import Client
    from scheduler.api import create_app

    settings = Settings(database_url=f"sqlite:///{tmp_path}/aigc.db", storage_url=f"file://{tmp_path}/data",
                        cache_dir=tmp_path / "cache", broker_url=None)
    client = Client(settings)
    job = client.submit("audio", "espeak-en", ["queued, never run"])
    app = create_app(settings, auth=False, client=client)
    http = TestClient(app)

    page = http.get(f"/jobs/{job.id}")
    assert page.status_code == 200 and "aigc_session" in page.cookies
    assert "default-src 'self'" in page.headers["content-security-policy"]
    token = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
    assert token is not None
    for path in ("/", "/models", "/schedules", f"/jobs/{job.id}/items/0", f"/ui/progress?id={job.id}"):
        assert http.get(path).status_code == 200, path
    assert http.get("/jobs/0123456789abcdef0123456789abcdef").status_code == 404
    assert http.get("/jobs/not-a-job").status_code == 404

    assert http.post(f"/jobs/{job.id}/cancel", data={"csrf": "0" * 64}).status_code == 403
    other = TestClient(app)  # another visitor (own session) sending our token
    other.get("/")
    assert other.post(f"/jobs/{job.id}/cancel", data={"csrf": token.group(1)}).status_code == 403
    assert client.status(job.id).status == JobStatus.queued
    done = http.post(f"/jobs/{job.id}/cancel", data={"csrf": token.group(1)}, follow_redirects=False)
    assert done.status_code == 303 and client.status(job.id).status == JobStatus.cancelled
