"""The fast PUT path's SigV4 signature is botocore's, byte for byte; where it must not run, it does not."""

from __future__ import annotations

import datetime as dt

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from aigc_core.s3put import FastPut, SigV4Signer, canonical_host, object_path

NOW = dt.datetime(2026, 12, 2, 21, 5, 9, tzinfo=dt.UTC)


def botocore_headers(monkeypatch, url: str, body: bytes, headers: dict, creds: Credentials, region: str) -> dict:
    import hashlib

    import botocore.auth

    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: NOW.replace(tzinfo=None))
    req = AWSRequest("PUT", url, headers={**headers, "X-Amz-Content-SHA256": hashlib.sha256(body).hexdigest()},
                     data=body)
    S3SigV4Auth(creds, "s3", region).add_auth(req)
    return {k.lower(): v for k, v in req.headers.items()}


@pytest.mark.parametrize("endpoint,key,token", [
    ("http://127.0.0.1:8333", "jobs/j1/items/000001.txt", None),
    ("https://s3.eu-west-1.amazonaws.com", "runs/nightly/jobs/a b/items/000002.json", "FwoGZXIvYXdzE//token="),
    ("https://minio.local:9000/s3", "p/ünïcode+plus=eq&amp;~tilde/000003.png", None),
])
def test_the_signature_is_botocores(monkeypatch, endpoint, key, token):
    import hashlib

    creds = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
    body = b'{"x": 1}\n' * 50
    path = object_path(endpoint, "my-bucket", key)
    origin = endpoint.split("/s3")[0] if endpoint.endswith("/s3") else endpoint
    mine = SigV4Signer("eu-west-1").headers(
        "PUT", canonical_host(endpoint), path, hashlib.sha256(body).hexdigest(),
        {"Content-Type": "application/json"}, creds.access_key, creds.secret_key, token, NOW)
    theirs = botocore_headers(monkeypatch, origin + path, body, {"Content-Type": "application/json"}, creds,
                              "eu-west-1")
    assert mine["authorization"] == theirs["authorization"]
    assert mine["x-amz-date"] == theirs["x-amz-date"] == "20261202T210509Z"
    if token:
        assert mine["x-amz-security-token"] == token


def test_a_changed_body_or_key_changes_the_signature():
    import hashlib

    s = SigV4Signer("us-east-1")
    sign = lambda path, body: s.headers("PUT", "h:1", path, hashlib.sha256(body).hexdigest(), {},  # noqa: E731
                                        "AK", "SK", None, NOW)["authorization"]
    assert len({sign("/b/k1", b"x"), sign("/b/k1", b"y"), sign("/b/k2", b"x")}) == 3


@pytest.mark.parametrize("endpoint,host", [
    ("http://127.0.0.1:8333", "127.0.0.1:8333"), ("http://s3.local:80", "s3.local"),
    ("https://s3.amazonaws.com", "s3.amazonaws.com"), ("https://s3.local:443/x", "s3.local"),
    ("http://[::1]:9000", "[::1]:9000"),
])
def test_host_drops_only_the_default_port(endpoint, host):
    assert canonical_host(endpoint) == host


def _client(endpoint="http://127.0.0.1:9", verify=None, **cfg):
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1", verify=verify,
                                          aws_access_key_id="a", aws_secret_access_key="b", config=Config(**cfg))


def test_off_behind_a_proxy_or_without_credentials(monkeypatch):
    creds = Credentials("a", "b")
    assert FastPut.for_client(_client(), creds, "bkt") is not None
    assert FastPut.for_client(_client(), None, "bkt") is None
    assert FastPut.for_client(_client(proxies={"http": "http://proxy:3128"}), creds, "bkt") is None
    monkeypatch.setenv("HTTP_PROXY", "http://proxy:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert FastPut.for_client(_client("http://s3.example.com"), creds, "bkt") is None


def test_too_large_or_off_is_left_to_botocore():
    fast = FastPut(Credentials("a", "b"), "http://127.0.0.1:9", "us-east-1", "bkt")
    assert fast.put("k", b"x" * (8 * 2**20 + 1), "application/octet-stream") == "skipped"
    fast.enabled = False
    assert fast.put("k", b"x", "text/plain") == "skipped"


def test_a_network_error_is_failed_not_raised():
    fast = FastPut(Credentials("a", "b"), "http://127.0.0.1:9", "us-east-1", "bkt", connect_timeout=1)
    assert fast.put("k", b"x", "text/plain") == "failed" and fast.enabled and fast.sent == 0


def test_settings_and_open_store_switch_it_off(monkeypatch):
    from aigc_core.settings import Settings
    from aigc_core.storage import open_store

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "a")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "b")
    monkeypatch.setenv("AIGC_S3_FAST_PUT", "false")
    assert Settings().s3_fast_put is False
    assert open_store("s3://bkt/p", "http://127.0.0.1:9", fast_put=False).fast is None
    assert open_store("s3://bkt/p", "http://127.0.0.1:9").fast is not None


def test_tls_follows_botocores_verify_setting(tmp_path):
    ca = tmp_path / "internal-ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    creds = Credentials("a", "b")
    assert FastPut.for_client(_client("https://s3.internal:9000", verify=False), creds, "bkt") is None
    fast = FastPut.for_client(_client("https://s3.internal:9000", verify=str(ca)), creds, "bkt")
    assert fast is not None and fast.http.ca_certs == str(ca) and fast.http.cert_reqs == "CERT_REQUIRED"
    default = FastPut.for_client(_client("https://s3.internal:9000"), creds, "bkt")
    assert default.http.cert_reqs == "CERT_REQUIRED" and default.http.ca_certs
    assert FastPut.for_client(_client("https://s3.internal", client_cert=str(ca)), creds, "bkt") is None


def test_a_credentials_refresh_that_fails_is_failed_not_raised():
    class Expired:
        def get_frozen_credentials(self):
            raise RuntimeError("the instance role's credentials could not be refreshed")

    fast = FastPut(Expired(), "http://127.0.0.1:9", "us-east-1", "bkt")
    assert fast.put("k", b"x", "text/plain") == "failed"


def test_a_misfit_refusal_turns_the_path_off_at_once_other_misses_only_in_a_row():
    fast = FastPut(Credentials("a", "b"), "http://127.0.0.1:9", "us-east-1", "bkt")
    for _ in range(7):
        fast.botocore_stored("failed")
    assert fast.enabled
    fast.botocore_stored("failed")
    assert not fast.enabled
    fast = FastPut(Credentials("a", "b"), "http://127.0.0.1:9", "us-east-1", "bkt")
    fast.botocore_stored("refused")
    assert not fast.enabled
