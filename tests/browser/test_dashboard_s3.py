"""Output bytes on S3: the dashboard answers with a short-lived presigned URL, never with the bytes or a
long-lived link (a real SeaweedFS server; the page-level tests are in test_dashboard.py)."""

from __future__ import annotations

import urllib.request
from urllib.parse import parse_qs, urlparse

import pytest
from fastapi.testclient import TestClient

from aigc_core.settings import Settings

pytestmark = pytest.mark.integration


def test_an_output_on_s3_is_a_redirect_to_a_presigned_url_that_expires(s3_bucket, s3_server, tmp_path):
    from scheduler import Client
    from scheduler.api import create_app

    settings = Settings(database_url=f"sqlite:///{tmp_path}/aigc.db", storage_url=f"s3://{s3_bucket}/runs",
                        s3_endpoint_url=s3_server.endpoint, cache_dir=tmp_path / "cache", broker_url=None)
    client = Client(settings)
    job = client.submit("audio", "espeak-en", ["Presigned and short-lived."])
    client.wait(job.id, timeout=120)
    stored = next(iter(client.results(job.id)))
    http = TestClient(create_app(settings, auth=False, client=client))

    resp = http.get(f"/outputs/{job.id}/0", follow_redirects=False)
    assert resp.status_code == 307 and resp.headers["cache-control"] == "private, no-store"
    url = resp.headers["location"]
    query = parse_qs(urlparse(url).query)
    assert url.startswith(s3_server.endpoint) and query["X-Amz-Expires"] == ["300"]
    with urllib.request.urlopen(url, timeout=10) as r:
        body, content_type = r.read(), r.headers["Content-Type"]
    assert content_type == "audio/wav" and len(body) == stored.size
    assert http.get(f"/outputs/{job.id}/7", follow_redirects=False).status_code == 404
