"""A truncated or corrupt ``*.safetensors`` file: refused at registration with the file's name, and when
it goes bad after registration, its job's items fail with the reason once (not a crash of the run, not
a retry until the items' attempts are used up)."""

from __future__ import annotations

import shutil
import struct

import pytest

from aigc_core.errors import SpecError
from aigc_core.model_checks import safetensors_problem
from aigc_core.schema import JobStatus


def _copy(tiny_text_model, tmp_path):
    return shutil.copytree(tiny_text_model, tmp_path / "copy")


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", ["truncated", "garbage", "huge header", "empty", "infinite offset"])
def test_safetensors_problem_names_what_is_wrong(tiny_text_model, tmp_path, damage):
    model = _copy(tiny_text_model, tmp_path)
    w = model / "model.safetensors"
    assert safetensors_problem(w) is None  # the intact file
    data = w.read_bytes()
    infinite = b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, Infinity]}}'
    w.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x00" * 64,
                   "huge header": struct.pack("<Q", 1 << 40) + data[8:], "empty": b"",
                   "infinite offset": struct.pack("<Q", len(infinite)) + infinite}[damage])
    problem = safetensors_problem(w)
    assert problem is not None and ("truncated" in problem or "header" in problem or "short" in problem)


def test_registering_a_model_with_truncated_weights_is_refused_with_the_file(client, tiny_text_model, tmp_path):
    model = _copy(tiny_text_model, tmp_path)
    _truncate(model / "model.safetensors")
    with pytest.raises(SpecError, match=r"model\.safetensors.*truncated"):
        client.register_model("broken", "text", model.as_uri())
    with pytest.raises(SpecError, match="unknown model 'broken'"):
        client.model("broken")  # nothing was written


def test_weights_that_go_bad_after_registration_fail_the_items_with_the_reason(client, tiny_text_model, tmp_path):
    model = _copy(tiny_text_model, tmp_path)
    client.register_model("soon-broken", "text", model.as_uri(), defaults={"max_new_tokens": 4})
    _truncate(model / "model.safetensors")
    job = client.submit("text", model="soon-broken", items=["one", "two", "three"])
    view = client.wait(job.id, timeout=120)
    assert view.status == JobStatus.failed and view.counts["failed"] == 3
    errors = {r.error for r in client.results(job.id)}
    assert len(errors) == 1
    (error,) = errors
    assert "model load failed" in error and "model.safetensors" in error and "corrupt" in error
    assert all(r.attempts <= 1 for r in client.results(job.id))  # failed at once, not retried to death


def test_a_safetensors_error_over_whole_files_is_retried_not_blamed_on_the_weights(client, tiny_text_model,
                                                                                      tmp_path, monkeypatch):
    """safetensors raises its SafetensorError for I/O failures too: with every file whole, the load's
    error is the pipeline's to retry, not a permanent "corrupt weights" failure of the items."""
    from aigc_core.errors import ModelLoadError
    from worker import runtime as runtime_module
    from worker.runtime import Runtime

    class SafetensorError(Exception):  # the name is what the runtime recognises
        pass

    def failing(*a, **kw):
        raise SafetensorError("Error while mmapping the file: I/O error")

    model = _copy(tiny_text_model, tmp_path)
    ref = client.register_model("flaky", "text", model.as_uri())
    monkeypatch.setattr(runtime_module, "load_backend", failing)
    rt = Runtime(client.settings, client.db, client.store, device="cpu")
    with pytest.raises(SafetensorError):
        rt._load(ref)
    _truncate(model / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: .*truncated"):
        rt._load(ref)
