"""The benchmarks' null backend (fixed bytes, no model, no torch) and how workers load a backend that is
not in the product's table: the AIGC_BACKENDS setting."""

from __future__ import annotations

import subprocess
import sys

import pytest

from aigc_core.schema import JobStatus
from aigc_core.settings import Settings
from aigc_models import GenRequest, load_backend
from aigc_models.base import BackendError
from bench.null import NULL_OUTPUT
from scheduler import Client

NULL = {"null": "bench.null:NullGenerator"}


def test_null_backend_returns_the_same_text_bytes_for_every_request(tmp_path):
    gen = load_backend("null", tmp_path, device="cpu", extra=NULL)
    outs = gen.generate([GenRequest(i, f"prompt {i}", {}, seed=i) for i in range(5)])
    assert [o.data for o in outs] == [NULL_OUTPUT] * 5
    assert {(o.media_type.split(";")[0], o.ext) for o in outs} == {("text/plain", "txt")}
    assert gen.memory_bytes() == 0 and gen.describe()["class"] == "NullGenerator"


def test_null_backend_never_imports_torch(tmp_path):
    code = ("import sys; from aigc_models import load_backend, GenRequest; "
            f"g = load_backend('null', {str(tmp_path)!r}, 'cpu', extra={NULL!r}); "
            "g.generate([GenRequest(0, 'x', {}, 0)]); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_null_backend_is_not_in_the_products_table(tmp_path):
    with pytest.raises(BackendError, match="unknown backend 'null'"):
        load_backend("null", tmp_path, device="cpu")


@pytest.mark.parametrize("value", ["null", "null=bench.null", "=bench.null:NullGenerator", "null=:X"])
def test_a_malformed_backends_setting_is_refused_whole(value):
    with pytest.raises(ValueError, match="AIGC_BACKENDS"):
        Settings(backends=value).extra_backends()


def test_a_job_on_a_null_model_commits_every_item(client, tmp_path):
    client = Client(client.settings.model_copy(update={"backends": "null=bench.null:NullGenerator"}))
    model_dir = tmp_path / "null-model"
    model_dir.mkdir()
    client.register_model("null", "text", model_dir.as_uri(), backend="null")
    job = client.submit("text", model="null", items=[f"item {i}" for i in range(7)])
    view = client.wait(job.id, timeout=120)
    assert view.status == JobStatus.succeeded and view.counts["succeeded"] == 7
    assert {client.store.get(r.key) for r in client.results(job.id)} == {NULL_OUTPUT}
