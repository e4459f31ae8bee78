"""The embedded default end to end: SQLite, a local folder, the in-process worker, a real tiny model."""

from __future__ import annotations

import hashlib
import json
import re

from aigc_core.schema import JobStatus


def test_a_job_runs_in_process_and_every_output_has_its_object_row_and_manifest(client, tmp_path):
    items = [{"custom_id": f"a{i}", "prompt": f"Headline: Story number {i}\n\n"} for i in range(10)]
    job = client.submit("text", model="tiny", items=items, params={"max_new_tokens": 6}, seed=7,
                        metadata={"desk": "city"})
    assert job.status == JobStatus.queued and job.item_count == 10
    view = client.wait(job.id, timeout=120)
    assert view.status == JobStatus.succeeded and view.final
    assert view.counts["succeeded"] == 10 and view.metadata == {"desk": "city"}

    results = list(client.results(job.id))
    assert [r.custom_id for r in results] == [f"a{i}" for i in range(10)]
    for r in results:
        data = client.store.get(r.key)
        assert hashlib.sha256(data).hexdigest() == r.sha256 and len(data) == r.size
        assert r.uri.startswith("file://")
        assert re.fullmatch(rf"jobs/{job.id}/items/{r.index:06d}\.[0-9a-f]{{32}}\.txt", r.key)
        assert r.provenance["seed"] == 7 + r.index

    out = client.download(job.id, tmp_path / "out")
    manifest = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert [m["custom_id"] for m in manifest] == [f"a{i}" for i in range(10)]
    assert all(m["status"] == "succeeded" and m["sha256"] for m in manifest)
    assert (out / "items" / "000003.txt").read_bytes() == client.store.get(results[3].key)
    # No provenance sidecar by default (AIGC_PROVENANCE_SIDECARS): the provenance is the row's, read above.
    assert (out / "errors.jsonl").read_text() == ""

    loads = [e for e in client.events(job.id) if e["type"] == "model_loaded"]
    assert len(loads) == 1 and loads[0]["model"] == "tiny@1"


def test_an_item_reproduces_alone_with_its_seed(client):
    prompts = [f"Headline: Item {i}\n\n" for i in range(6)]
    params = {"max_new_tokens": 8, "temperature": 0.9, "top_p": 0.9}
    big = client.submit("text", model="tiny", items=prompts, params=params, seed=100)
    client.wait(big.id, timeout=120)
    texts = [client.store.get(r.key) for r in client.results(big.id)]
    # Item 4 of that job, alone in a job of its own with seed 104 (= 100 + index 4).
    alone = client.submit("text", model="tiny", items=[prompts[4]], params=params, seed=104)
    client.wait(alone.id, timeout=120)
    (r,) = list(client.results(alone.id))
    assert client.store.get(r.key) == texts[4]
