"""The S3 object store against a real S3-compatible server (SeaweedFS) with signatures checked."""

from __future__ import annotations

import pytest

from aigc_core.errors import NotFound, StorageError
from aigc_core.storage import S3Store, open_store
from tests.support.s3server import ACCESS_KEY

pytestmark = pytest.mark.integration


def test_put_get_list_exists_under_a_prefix(s3_bucket, s3_server):
    store = open_store(f"s3://{s3_bucket}/runs/nightly", s3_server.endpoint)
    info = store.put("jobs/j1/items/000001.txt", b"hello", "text/plain")
    assert info.uri == f"s3://{s3_bucket}/runs/nightly/jobs/j1/items/000001.txt" and info.size == 5
    store.put("jobs/j1/items/000002.txt", b"world")
    store.put("jobs/j2/items/000001.txt", b"other job")
    assert store.get("jobs/j1/items/000001.txt") == b"hello"
    assert store.exists("jobs/j1/items/000002.txt") and not store.exists("jobs/j1/items/000003.txt")
    assert list(store.list("jobs/j1/")) == ["jobs/j1/items/000001.txt", "jobs/j1/items/000002.txt"]
    head = s3_server.client().head_object(Bucket=s3_bucket, Key="runs/nightly/jobs/j1/items/000001.txt")
    assert head["ContentType"] == "text/plain"


def test_listing_pages_past_a_thousand_keys(s3_bucket, s3_server):
    store = S3Store(s3_bucket, "p", endpoint_url=s3_server.endpoint)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as ex:
        list(ex.map(lambda i: store.put(f"k/{i:05d}", b"x"), range(1005)))
    assert len(list(store.list("k/"))) == 1005


def test_a_missing_object_is_not_found(s3_bucket, s3_server):
    with pytest.raises(NotFound):
        S3Store(s3_bucket, endpoint_url=s3_server.endpoint).get("nope/never")


def test_wrong_credentials_are_a_storage_error_without_the_secret(s3_bucket, s3_server, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    store = S3Store(s3_bucket, endpoint_url=s3_server.endpoint)
    with pytest.raises(StorageError) as e:
        store.put("a/b", b"x")
    assert "not-the-secret" not in str(e.value)


def test_large_files_go_up_in_parts_and_come_back_streamed(s3_bucket, s3_server, tmp_path):
    import hashlib
    import os

    src = tmp_path / "model.safetensors"
    src.write_bytes(os.urandom(70 * 2**20))  # over the 64 MiB multipart threshold
    store = S3Store(s3_bucket, "models", endpoint_url=s3_server.endpoint)
    assert store.upload("big/1/model.safetensors", src).size == 70 * 2**20
    head = s3_server.client().head_object(Bucket=s3_bucket, Key="models/big/1/model.safetensors")
    assert head["ETag"].strip('"').endswith("-2")  # two parts: a multipart upload, not one PUT
    store.download("big/1/model.safetensors", tmp_path / "back.safetensors")
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(tmp_path / "back.safetensors") == digest(src)
    with pytest.raises(NotFound):
        store.download("big/1/missing", tmp_path / "missing")
    assert not list(tmp_path.glob(".tmp-*"))


def test_small_puts_take_the_signed_fast_path(s3_bucket, s3_server):
    store = S3Store(s3_bucket, "fast", endpoint_url=s3_server.endpoint)
    assert store.fast is not None
    for i, (key, ctype) in enumerate([("jobs/j/items/000001.txt", "text/plain"),
                                      ("jobs/j/items/000001.json", "application/json"),
                                      ("jobs/j/a b/ünï~code+.txt", "text/plain; charset=utf-8")]):
        store.put(key, f"body {i}".encode(), ctype)
        head = s3_server.client().head_object(Bucket=s3_bucket, Key=f"fast/{key}")
        assert head["ContentType"] == ctype and store.get(key) == f"body {i}".encode()
    assert store.fast.sent == 3 and store.fast.enabled  # botocore stored none of them


def test_the_server_checks_the_fast_paths_signature(s3_bucket, s3_server):
    from botocore.credentials import Credentials

    from aigc_core.s3put import FastPut

    fast = FastPut(Credentials(ACCESS_KEY, "not-the-secret"), s3_server.endpoint, "us-east-1", s3_bucket)
    assert fast.put("forged", b"x", "text/plain") == "refused"
    assert not S3Store(s3_bucket, endpoint_url=s3_server.endpoint).exists("forged")


def test_a_refused_fast_put_goes_to_botocore_and_turns_the_path_off(s3_bucket, s3_server, caplog):
    from botocore.credentials import Credentials

    store = S3Store(s3_bucket, endpoint_url=s3_server.endpoint)
    store.fast.credentials = Credentials(ACCESS_KEY, "a-wrong-secret")  # this server refuses it, botocore not
    assert store.put("a/1", b"one").size == 3 and store.get("a/1") == b"one"
    assert not store.fast.enabled and "botocore does every PUT from now on" in caplog.text
    store.put("a/2", b"two")
    assert store.get("a/2") == b"two" and store.fast.sent == 0


def test_a_network_error_on_the_fast_path_is_retried_by_botocore(s3_bucket, s3_server):
    store = S3Store(s3_bucket, endpoint_url=s3_server.endpoint)
    import urllib3

    store.fast.http = urllib3.HTTPConnectionPool("127.0.0.1", 9, retries=False)  # nothing listens there
    store.put("b/1", b"kept")
    assert store.get("b/1") == b"kept" and store.fast.enabled and store.fast.sent == 0


def test_wrong_credentials_leave_the_fast_path_on(s3_bucket, s3_server, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    store = S3Store(s3_bucket, endpoint_url=s3_server.endpoint)
    with pytest.raises(StorageError):
        store.put("c/1", b"x")
    assert store.fast.enabled  # botocore failed too: the credentials, not the path, are wrong
