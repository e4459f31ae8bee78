"""``aigc demo`` in a shared deployment: its models go to the object store every worker reads, or the
demo refuses to run; embedded, nothing changes (a file:// path in the local cache)."""

from __future__ import annotations

import pytest

from aigc_core.errors import AigcError
from aigc_core.registry import dir_digest
from aigc_core.settings import Settings


class FakeS3Store:
    """The object store of a deployment, as far as registering a model needs it."""

    def __init__(self):
        self.objects: dict[str, bytes] = {}

    def uri(self, key: str) -> str:
        return f"s3://outputs/aigc/{key}"

    def exists(self, key: str) -> bool:
        return key in self.objects

    def upload(self, key, path, content_type="application/octet-stream"):
        self.objects[key] = path.read_bytes()


@pytest.fixture
def fake_s3_registration(monkeypatch):
    """Registration reads an s3:// model's files from S3 itself (tests/integration test those checks):
    with the fake store above, it takes the digest _register gives and reads nothing."""
    monkeypatch.setattr("aigc_core.registry.inspect_model",
                        lambda name, kind, uri, *, backend, digest, endpoint_url: ({}, digest))


@pytest.mark.parametrize("shared", [{"broker_url": "redis://127.0.0.1:1/0"},
                                    {"database_url": "postgresql://app:pw@127.0.0.1:1/aigc"}])
def test_the_demo_refuses_a_shared_deployment_whose_store_is_a_local_folder(tmp_path, shared):
    from worker.demo import run_demo

    settings = Settings(**{"storage_url": f"file://{tmp_path}/data", "database_url": f"sqlite:///{tmp_path}/a.db",
                           "cache_dir": tmp_path / "cache", **shared})
    with pytest.raises(AigcError) as e:
        run_demo(settings, n_items=1)
    assert "AIGC_STORAGE_URL" in str(e.value) and "s3://" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "a.db").exists()  # refused before anything was written


def test_in_a_shared_deployment_the_demo_models_are_uploaded_and_registered_by_s3_uri(client, tiny_text_model,
                                                                                    fake_s3_registration):
    from worker.demo import _register

    client.store = FakeS3Store()
    ref = _register(client, "demo-news-base", tiny_text_model, {"recipe": 1}, upload=True)
    digest = dir_digest(tiny_text_model)
    assert ref.uri.startswith("s3://outputs/aigc/models/demo-news-base/") and ref.digest == digest
    prefix = ref.uri.removeprefix("s3://outputs/aigc/") + "/"
    files = sorted(p.relative_to(tiny_text_model).as_posix() for p in tiny_text_model.rglob("*") if p.is_file())
    assert sorted(k.removeprefix(prefix) for k in client.store.objects) == files  # what materialize fetches
    # Run again: the same version, nothing uploaded twice.
    client.store.objects.clear()
    assert _register(client, "demo-news-base", tiny_text_model, {"recipe": 1}, upload=True).tag == ref.tag


def test_a_file_uri_registered_before_is_not_reused_in_a_shared_deployment(client, tiny_text_model,
                                                                          fake_s3_registration):
    from worker.demo import _register

    local = _register(client, "demo-news", tiny_text_model, {})
    assert local.uri.startswith("file://")  # embedded: unchanged
    client.store = FakeS3Store()
    shared = _register(client, "demo-news", tiny_text_model, {}, upload=True)
    assert shared.version == local.version + 1 and shared.uri.startswith("s3://")


def test_a_second_demo_run_finds_the_trained_version_instead_of_registering_it_again(client, tiny_text_model):
    """The fine-tune registers demo-news@1 and the demo caches a copy of its folder; the next run must
    find @1 by digest, so the cache's lineage lives beside the folder, not in it."""
    import shutil

    from rich.console import Console

    from worker.demo import DEMO_MODEL, _copy_to_cache, _key, corpus_texts, ensure_demo_model

    trained = client.register_model(DEMO_MODEL, "text", tiny_text_model.as_uri(), lineage={"job_id": "x"})
    cached = client.settings.cache_dir / "models" / DEMO_MODEL / _key(corpus_texts())
    _copy_to_cache(client, trained, cached, {"job_id": "x", "metrics": {"loss": 1.0}})
    assert not (cached / "lineage.json").exists()
    ref, metrics = ensure_demo_model(client, Console(quiet=True))
    assert ref.version == trained.version and metrics is None  # from the cache, the same version
    assert [m["version"] for m in client.models() if m["name"] == DEMO_MODEL] == [trained.version]
    # A cache written before (its lineage inside the folder) still loads: it registers once more.
    shutil.move(cached.with_name(cached.name + ".lineage.json"), cached / "lineage.json")
    ref, _ = ensure_demo_model(client, Console(quiet=True))
    assert ref.version == trained.version + 1
