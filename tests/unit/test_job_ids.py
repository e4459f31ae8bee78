"""Job ids as people copy them: a unique prefix of 6 or more hex characters names a job everywhere
the Client (and so the CLI) takes one; shorter or ambiguous prefixes are refused with the reason."""

from __future__ import annotations

import types
import uuid

import pytest

from aigc_core.errors import NotFound, SpecError


@pytest.fixture
def twins(client, monkeypatch):
    """Two jobs whose ids share their first 8 characters, and one that does not."""
    real = uuid.uuid4
    ids = iter(["abcdef01" + "1" * 24, "abcdef01" + "2" * 24, "abc99999" + "3" * 24])
    monkeypatch.setattr("aigc_core.schema.uuid.uuid4", lambda: types.SimpleNamespace(hex=next(ids, None) or real().hex))
    jobs = [client.submit("text", model="tiny", items=["x"]).id for _ in range(3)]
    monkeypatch.setattr("aigc_core.schema.uuid.uuid4", real)
    return jobs


def test_a_unique_prefix_of_six_or_more_names_the_job(client, twins):
    a, b, c = twins
    for given in ("abc999", "abc9999", "ABC99999", c[:20], c, "abc99999…"):
        assert client.status(given).id == c
    assert client.status("abcdef011").id == a and client.status("abcdef012").id == b


def test_an_ambiguous_prefix_lists_the_matching_jobs(client, twins):
    a, b, _ = twins
    with pytest.raises(SpecError) as info:
        client.status("abcdef01")
    assert "ambiguous" in str(info.value) and a in str(info.value) and b in str(info.value)


def test_a_prefix_shorter_than_six_is_refused_with_the_rule(client, twins):
    with pytest.raises(SpecError, match="at least 6"):
        client.status("abc99")


def test_an_unknown_prefix_or_text_that_is_not_an_id_is_not_found(client, twins):
    for given in ("fedcba", "0" * 32, "not-an-id", "abcdef01" * 5):
        with pytest.raises(NotFound):
            client.status(given)


def test_every_client_method_that_takes_a_job_id_takes_a_prefix(client, tmp_path):
    job = client.submit("text", model="tiny", items=["Headline: x"], params={"max_new_tokens": 2})
    short = job.id[:8]
    assert client.wait(short, timeout=120).status.value == "succeeded"
    assert [r.custom_id for r in client.results(short)] == ["0"]
    assert (client.download(short, tmp_path / "out") / "manifest.jsonl").exists()
    assert client.events(short)[0]["type"] == "submitted"
    assert client.retry_failed(short) == 0
    assert client.cancel(short).id == job.id


def test_resolve_job_id_asks_for_a_few_rows_by_prefix(client, twins):
    from aigc_core.jobs import resolve_job_id

    with client.db.session() as s:
        assert resolve_job_id(s, "abc999") == twins[2]
        assert resolve_job_id(s, twins[0]) == twins[0]
