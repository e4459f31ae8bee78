"""The local-folder object store: round trips, refused keys, atomic writes, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from aigc_core.errors import NotFound, SpecError
from aigc_core.storage import LocalStore, open_store


def _all_files(path: Path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())


@pytest.fixture
def store(tmp_path) -> LocalStore:
    return LocalStore(tmp_path / "root")


def test_put_then_get_exists_and_list_round_trip(store):
    info = store.put("jobs/j1/items/000000.txt", b"hello", "text/plain")
    store.put("jobs/j1/items/000001.txt", b"world")
    store.put("jobs/j2/manifest.jsonl", b"{}\n")
    assert info.key == "jobs/j1/items/000000.txt" and info.size == 5
    assert info.uri == (store.root / "jobs/j1/items/000000.txt").as_uri()
    assert store.get("jobs/j1/items/000000.txt") == b"hello"
    assert store.exists("jobs/j1/items/000001.txt")
    assert not store.exists("jobs/j1/items/000002.txt")
    assert list(store.list("jobs/j1/")) == ["jobs/j1/items/000000.txt", "jobs/j1/items/000001.txt"]
    assert list(store.list("")) == [
        "jobs/j1/items/000000.txt", "jobs/j1/items/000001.txt", "jobs/j2/manifest.jsonl",
    ]


def test_put_overwrites_an_existing_key(store):
    store.put("a/b.bin", b"first")
    store.put("a/b.bin", b"second")
    assert store.get("a/b.bin") == b"second"
    assert list(store.list("a/")) == ["a/b.bin"]


def test_empty_object_round_trips(store):
    assert store.put("a/empty", b"").size == 0
    assert store.get("a/empty") == b"" and store.exists("a/empty")


def test_download_copies_the_object_to_a_local_path(store, tmp_path):
    store.put("jobs/j/x.txt", b"data")
    dest = tmp_path / "out" / "deep" / "x.txt"
    store.download("jobs/j/x.txt", dest)
    assert dest.read_bytes() == b"data"


@pytest.mark.parametrize("key", [
    "../escape.txt",
    "jobs/../../escape.txt",
    "jobs/..",
    "/etc/escape.txt",
    "jobs//x.txt",
    "jobs/x/",
    "",
    "jobs\\..\\escape.txt",
    "jobs/./x.txt",
])
def test_unsafe_keys_are_refused_and_nothing_is_written_anywhere(tmp_path, key):
    root = tmp_path / "root"
    store = LocalStore(root)
    with pytest.raises(SpecError):
        store.put(key, b"x")
    with pytest.raises(SpecError):
        store.get(key)
    with pytest.raises(SpecError):
        store.exists(key)
    assert _all_files(tmp_path) == []


def test_put_leaves_no_temporary_files_behind(store):
    for i in range(5):
        store.put(f"jobs/j/items/{i:06d}.txt", b"x" * (i + 1))
    store.put("jobs/j/items/000000.txt", b"again")
    files = _all_files(store.root)
    assert files == [f"jobs/j/items/{i:06d}.txt" for i in range(5)]
    assert not any(Path(f).name.startswith(".") for f in files)


def test_list_skips_temporary_files_of_a_write_in_progress(store):
    store.put("jobs/j/a.txt", b"a")
    (store.root / "jobs/j/.tmp-abc123").write_bytes(b"partial")
    assert list(store.list("jobs/")) == ["jobs/j/a.txt"]


def test_get_of_a_missing_key_raises_not_found(store):
    with pytest.raises(NotFound) as info:
        store.get("jobs/none/items/000000.txt")
    assert "000000.txt" in str(info.value)


def test_download_of_a_missing_key_raises_not_found_and_writes_nothing(store, tmp_path):
    dest = tmp_path / "out" / "x.txt"
    with pytest.raises(NotFound):
        store.download("jobs/none/x.txt", dest)
    assert not dest.exists()


def test_list_of_an_empty_store_is_empty(store):
    assert list(store.list("")) == []


def test_open_store_gives_a_local_store_for_file_urls(tmp_path):
    s = open_store(f"file://{tmp_path}/data")
    assert isinstance(s, LocalStore)
    s.put("k/v", b"1")
    assert (tmp_path / "data" / "k" / "v").read_bytes() == b"1"


@pytest.mark.parametrize("url", ["ftp://host/dir", "gs://bucket/prefix", "/plain/path", "http://x/y"])
def test_open_store_refuses_unknown_schemes(url):
    with pytest.raises(SpecError) as info:
        open_store(url)
    assert url in str(info.value)


def test_open_store_refuses_an_s3_url_without_a_bucket():
    with pytest.raises(SpecError, match="bucket"):
        open_store("s3:///prefix")


@pytest.mark.parametrize("url", ["s3://bkt/./runs", "s3://bkt/runs/../other", "s3://bkt/a//b"])
def test_open_store_refuses_an_s3_prefix_with_dot_or_empty_parts(url):
    with pytest.raises(SpecError, match="storage prefix"):
        open_store(url, "http://127.0.0.1:9")


def test_upload_copies_a_file_in_and_download_copies_it_out(store, tmp_path):
    src = tmp_path / "weights.safetensors"
    src.write_bytes(b"w" * 100_000)
    info = store.upload("models/m/1/weights.safetensors", src)
    assert info.size == 100_000
    store.download("models/m/1/weights.safetensors", tmp_path / "back" / "w.bin")
    assert (tmp_path / "back" / "w.bin").read_bytes() == src.read_bytes()
    assert list(store.list("models/")) == ["models/m/1/weights.safetensors"]  # no temporary file left
