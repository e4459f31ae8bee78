"""Jobs that wait for other jobs: ``after=`` and items ``from`` another job's text outputs."""

from __future__ import annotations

import hashlib

import pytest

from aigc_core.errors import SpecError
from aigc_core.schema import ItemStatus, JobStatus

TOO_LONG = "word " * 400  # past the tiny model's 256-token context: that item fails


def _lax(client) -> str:
    """The tiny model registered with a context it does not have: submit lets TOO_LONG through (it trusts
    the registry's context_length), the worker fails that item."""
    ref = client.model("tiny")
    client.register_model("tiny-lax", "text", ref.uri, defaults={"max_new_tokens": 8, "context_length": 4096})
    return "tiny-lax"


def test_items_from_another_job_read_its_outputs_once_it_has_run(client):
    a = client.submit("text", model=_lax(client), items=[{"custom_id": "x", "prompt": "Headline: One\n\n"},
                                                         {"custom_id": "y", "prompt": TOO_LONG}])
    b = client.submit("text", model="tiny", items=[{"custom_id": "from-x", "from": {"job": a.id, "custom_id": "x"}},
                                                   {"custom_id": "from-y", "from": {"job": a.id, "custom_id": "y"}}])
    assert b.status == JobStatus.waiting
    view = client.wait(b.id, timeout=120)  # runs a first, then b
    assert client.status(a.id).status == JobStatus.partially_failed
    assert view.status == JobStatus.partially_failed
    ra = {r.custom_id: r for r in client.results(a.id)}
    rb = {r.custom_id: r for r in client.results(b.id)}
    x_text = client.store.get(ra["x"].key)
    assert rb["from-x"].status == ItemStatus.succeeded
    assert rb["from-x"].provenance["prompt_sha256"] == hashlib.sha256(x_text).hexdigest()
    assert rb["from-x"].provenance["source"] == {"job": a.id, "custom_id": "x"}
    assert rb["from-y"].status == ItemStatus.failed and "did not succeed" in rb["from-y"].error


def test_after_a_failed_job_the_waiting_job_fails_with_the_reason(client):
    a = client.submit("text", model=_lax(client), items=[TOO_LONG])
    b = client.submit("text", model="tiny", items=["Headline: Two\n\n"], after=a.id)
    assert client.wait(b.id, timeout=120).status == JobStatus.failed
    (r,) = list(client.results(b.id))
    assert r.error == f"job {a.id} it waited for ended failed"


def test_after_a_finished_job_starts_at_once(client):
    a = client.submit("text", model="tiny", items=["Headline: Three\n\n"])
    assert client.wait(a.id, timeout=120).status == JobStatus.succeeded
    b = client.submit("text", model="tiny", items=["Headline: Four\n\n"], after=[a.id])
    assert b.status == JobStatus.queued
    assert client.wait(b.id, timeout=120).status == JobStatus.succeeded


def test_waiting_on_unknown_jobs_or_items_is_refused(client):
    a = client.submit("text", model="tiny", items=[{"custom_id": "x", "prompt": "hi"}])
    with pytest.raises(SpecError, match="no job 'nope'"):
        client.submit("text", model="tiny", items=["hi"], after="nope")
    with pytest.raises(SpecError, match="no item with custom_id 'zz'"):
        client.submit("text", model="tiny", items=[{"from": {"job": a.id, "custom_id": "zz"}}])
    with pytest.raises(SpecError, match="give no prompt"):
        client.submit("text", model="tiny", items=[{"prompt": "hi", "from": {"job": a.id, "custom_id": "x"}}])
