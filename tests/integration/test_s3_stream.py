"""put_stream against a real S3 server (SeaweedFS): multipart in 5 MiB parts, aborted on failure."""

from __future__ import annotations

import hashlib

import pytest

from aigc_core.errors import SpecError, StorageError
from aigc_core.storage import MIN_PART_BYTES, S3Store

pytestmark = pytest.mark.integration


def _chunks(total: int, size: int = 300_000):
    """Deterministic bytes in uneven pieces, as manifest pages come."""
    block = hashlib.sha256(b"aigc").digest() * (size // 32 + 1)
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        yield block[:n]
        sent += n


def test_a_stream_past_one_part_is_a_multipart_upload_of_whole_parts(s3_bucket, s3_server):
    store = S3Store(s3_bucket, "p", endpoint_url=s3_server.endpoint, part_bytes=MIN_PART_BYTES)
    total = 2 * MIN_PART_BYTES + 123_457  # three parts: two of at least 5 MiB, a short last one
    info = store.put_stream("jobs/j/manifest.jsonl", _chunks(total), "application/x-ndjson")
    assert info.size == total and info.uri == f"s3://{s3_bucket}/p/jobs/j/manifest.jsonl"
    assert store.get("jobs/j/manifest.jsonl") == b"".join(_chunks(total))
    head = s3_server.client().head_object(Bucket=s3_bucket, Key="p/jobs/j/manifest.jsonl")
    assert head["ContentType"] == "application/x-ndjson"
    assert head["ETag"].strip('"').endswith("-3")  # a multipart object's ETag counts its parts


def test_a_small_stream_is_one_put(s3_bucket, s3_server):
    store = S3Store(s3_bucket, endpoint_url=s3_server.endpoint)
    assert store.put_stream("jobs/j/errors.jsonl", iter(())).size == 0
    assert store.get("jobs/j/errors.jsonl") == b""
    store.put_stream("jobs/j/m.jsonl", [b"a\n", b"b\n"])
    head = s3_server.client().head_object(Bucket=s3_bucket, Key="jobs/j/m.jsonl")
    assert "-" not in head["ETag"] and store.get("jobs/j/m.jsonl") == b"a\nb\n"


def test_a_stream_that_fails_midway_aborts_its_upload_and_leaves_the_old_object(s3_bucket, s3_server):
    store = S3Store(s3_bucket, endpoint_url=s3_server.endpoint, part_bytes=MIN_PART_BYTES)
    store.put("jobs/j/manifest.jsonl", b"old\n")

    def broken():
        yield from _chunks(MIN_PART_BYTES + 10)  # one part uploaded
        raise StorageError("the database went away mid-read")

    with pytest.raises(StorageError):
        store.put_stream("jobs/j/manifest.jsonl", broken())
    assert store.get("jobs/j/manifest.jsonl") == b"old\n"
    uploads = s3_server.client().list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
    assert uploads == []


def test_a_part_size_under_five_mebibytes_is_refused(s3_bucket, s3_server):
    with pytest.raises(SpecError):
        S3Store(s3_bucket, endpoint_url=s3_server.endpoint, part_bytes=MIN_PART_BYTES - 1)
