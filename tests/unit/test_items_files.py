"""Items files, one rule for job files and schedules: a local path (next to the file that names it),
or an s3:// object in the storage bucket, or in a bucket AIGC_ITEMS_FILE_BUCKETS allows."""

from __future__ import annotations

import shutil
from datetime import UTC
from pathlib import Path

import pytest

from aigc_core.errors import SpecError
from aigc_core.settings import Settings

S3_SETTINGS = Settings(storage_url="s3://outputs/aigc", s3_endpoint_url="http://127.0.0.1:1")


@pytest.fixture
def fake_s3(tmp_path, monkeypatch) -> dict[str, Path]:
    """s3://bucket/key -> a local file: the download the rule leads to, without a server."""
    objects: dict[str, Path] = {}
    fetched: list[str] = []

    def download_uri(uri: str, dest: Path, *, endpoint_url=None) -> Path:
        from aigc_core.errors import NotFound

        fetched.append(uri)
        if uri not in objects:
            raise NotFound(f"no object {uri}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(objects[uri], dest)
        return dest

    monkeypatch.setattr("aigc_core.storage.download_uri", download_uri)
    objects["fetched"] = fetched  # type: ignore[assignment]
    return objects


def _items(tmp_path: Path, name: str = "items.jsonl") -> Path:
    path = tmp_path / name
    path.write_text('{"custom_id": "a", "prompt": "x"}\n')
    return path


def test_a_local_path_is_read_next_to_the_file_that_names_it(tmp_path):
    from aigc_core.spec import read_items_file

    _items(tmp_path)
    assert read_items_file("items.jsonl", base_dir=tmp_path, settings=Settings()) == [{"custom_id": "a", "prompt": "x"}]
    assert read_items_file((tmp_path / "items.jsonl").as_uri(), settings=Settings())[0]["custom_id"] == "a"


def test_an_s3_items_file_in_the_storage_bucket_is_read(tmp_path, fake_s3):
    from aigc_core.spec import read_items_file

    fake_s3["s3://outputs/lists/items.jsonl"] = _items(tmp_path)
    assert read_items_file("s3://outputs/lists/items.jsonl", settings=S3_SETTINGS)[0]["prompt"] == "x"


@pytest.mark.parametrize("settings", [S3_SETTINGS, Settings()])
def test_an_s3_items_file_in_another_bucket_is_refused_naming_the_setting(tmp_path, fake_s3, settings):
    from aigc_core.spec import read_items_file

    fake_s3["s3://another-bucket/items.jsonl"] = _items(tmp_path)
    with pytest.raises(SpecError) as e:
        read_items_file("s3://another-bucket/items.jsonl", settings=settings)
    assert "another-bucket" in str(e.value) and "AIGC_ITEMS_FILE_BUCKETS" in str(e.value)
    assert fake_s3["fetched"] == []  # refused before anything is fetched


def test_aigc_items_file_buckets_allows_other_buckets(tmp_path, fake_s3, monkeypatch):
    from aigc_core.spec import read_items_file

    monkeypatch.setenv("AIGC_ITEMS_FILE_BUCKETS", "lists, another-bucket")
    fake_s3["s3://another-bucket/items.jsonl"] = _items(tmp_path)
    assert read_items_file("s3://another-bucket/items.jsonl", settings=Settings())[0]["custom_id"] == "a"


@pytest.mark.parametrize("ref", ["http://example.com/items.jsonl", "hf://org/items.jsonl", "s3:///items.jsonl"])
def test_other_uris_are_refused_saying_what_is_accepted(ref):
    from aigc_core.spec import read_items_file

    with pytest.raises(SpecError, match="a local path, file:///path or s3://bucket/key"):
        read_items_file(ref, settings=S3_SETTINGS)


def test_a_job_file_and_a_schedule_follow_the_same_rule(tmp_path, fake_s3, monkeypatch):
    from scheduler.cli.root import load_job_file
    from scheduler.cron.schedules import load_schedules_file

    for var, value in (("AIGC_STORAGE_URL", "s3://outputs/aigc"), ("AIGC_S3_ENDPOINT_URL", "http://127.0.0.1:1")):
        monkeypatch.setenv(var, value)
    fake_s3["s3://outputs/items.jsonl"] = fake_s3["s3://another-bucket/items.jsonl"] = _items(tmp_path)
    for bucket, allowed in (("outputs", True), ("another-bucket", False)):
        (tmp_path / "job.yaml").write_text(f"model: tiny\nitems_file: s3://{bucket}/items.jsonl\n")
        (tmp_path / "s.yaml").write_text("schedules:\n  - {name: n, cron: '0 7 * * *', job: "
                                         f"{{model: tiny, items_file: 's3://{bucket}/items.jsonl'}}}}\n")
        if allowed:
            assert load_job_file(tmp_path / "job.yaml")["items"] == [{"custom_id": "a", "prompt": "x"}]
            assert load_schedules_file(tmp_path / "s.yaml", settings=Settings())[0].job.items_file == \
                "s3://outputs/items.jsonl"
        else:
            with pytest.raises(SpecError, match="AIGC_ITEMS_FILE_BUCKETS") as job_error:
                load_job_file(tmp_path / "job.yaml")
            with pytest.raises(SpecError, match="AIGC_ITEMS_FILE_BUCKETS") as schedule_error:
                load_schedules_file(tmp_path / "s.yaml", settings=Settings())
            assert str(job_error.value).split(": ", 1)[1] in str(schedule_error.value)


def test_a_schedule_whose_bucket_is_not_allowed_fails_its_firing_with_the_rule(client, tmp_path, fake_s3):
    from datetime import datetime

    from aigc_core.schema import RunOutcome
    from scheduler.cron.schedules import fire_due, parse_schedules, sync_schedules

    fake_s3["s3://another-bucket/items.jsonl"] = _items(tmp_path)
    defs = parse_schedules({"schedules": [{"name": "n", "cron": "0 * * * *", "job": {
        "model": "tiny", "items_file": "s3://another-bucket/items.jsonl"}}]})  # stored before the rule was checked
    sync_schedules(client.db, defs, now=datetime(2026, 5, 1, 9, 30, tzinfo=UTC))
    (fired,) = fire_due(client, datetime(2026, 5, 1, 10, 0, 5, tzinfo=UTC))
    assert fired.outcome == RunOutcome.failed and "AIGC_ITEMS_FILE_BUCKETS" in fired.error
    assert fake_s3["fetched"] == []
