"""The S3 object store against a real S3-compatible server (SeaweedFS) with signatures checked."""

from __future__ import annotations

import pytest

from aigc_core.errors import NotFound, StorageError
from aigc_core.storage import S3Store, open_store

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
