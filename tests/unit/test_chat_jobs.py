"""Chat items and stop strings at submit (spec, items files, job YAML) and end to end in embedded mode
(SQLite, a local folder, the in-process worker, a tiny ChatML checkpoint)."""

from __future__ import annotations

import hashlib
import json

import pytest

from aigc_core.errors import SpecError
from aigc_core.schema import Item, JobStatus
from aigc_core.settings import Limits
from aigc_core.spec import TextParams, check_limits, load_items_jsonl, load_yaml, parse_spec
from tests.support.chat_models import CHATML, CHECKPOINT_SAMPLING, build_chat_model

USER = [{"role": "user", "content": "Storm closes the harbour road"}]


def _spec(items, **kw):
    items = [{"prompt": i} if isinstance(i, str) else i for i in items]
    return parse_spec({"kind": "text", "model": "m", "items": items, **kw})


# ---- the submit-side contract ----------------------------------------------------------------------

def test_text_params_tell_not_set_from_a_value():
    p = TextParams()
    assert all(v is None for v in p.model_dump().values())
    assert TextParams(temperature=0.0).temperature == 0.0


def test_submit_time_ranges_and_the_max_new_tokens_limit_still_hold():
    limits = Limits(max_new_tokens=64)
    check_limits(_spec(["a"]), limits, {})  # nothing set: the worker's defaults apply
    with pytest.raises(SpecError, match=r"params.max_new_tokens: 65 is over the limit of 64"):
        check_limits(_spec(["a"], params={"max_new_tokens": 65}), limits, {})
    with pytest.raises(SpecError, match=r"items\[0\].params.temperature"):
        check_limits(_spec([{"prompt": "a", "params": {"temperature": 11}}]), limits, {})
    with pytest.raises(SpecError, match=r"params.max_new_tokens: 99"):
        check_limits(_spec(["a"]), limits, {"max_new_tokens": 99})  # a registry default too


def test_stop_takes_up_to_four_non_empty_strings():
    limits = Limits()
    check_limits(_spec(["a"], params={"stop": ["\n\n", "END"]}), limits, {})
    check_limits(_spec(["a"], params={"stop": "END"}), limits, {})  # one string, as OpenAI allows
    with pytest.raises(SpecError, match="stop"):
        check_limits(_spec(["a"], params={"stop": ["a", "b", "c", "d", "e"]}), limits, {})
    with pytest.raises(SpecError, match="stop"):
        check_limits(_spec(["a"], params={"stop": [""]}), limits, {})


def test_a_chat_item_is_checked_and_the_job_system_goes_in_front():
    from aigc_core.spec import chat_messages

    spec = _spec([{"messages": USER}, {"messages": [{"role": "system", "content": "own"}, *USER]}],
                 system="You write headlines.")
    check_limits(spec, Limits(), {})
    assert chat_messages(spec, spec.items[0]) == [{"role": "system", "content": "You write headlines."}, *USER]
    assert chat_messages(spec, spec.items[1])[0] == {"role": "system", "content": "own"}  # the item's wins


@pytest.mark.parametrize("job, match", [
    ({"items": [{"messages": USER, "prompt": "x"}]}, "messages or prompt, not both"),
    ({"items": [{"messages": [{"role": "robot", "content": "x"}]}]}, "role"),
    ({"items": [{"messages": []}]}, "messages"),
    ({"items": [{"prompt": "a raw prompt"}], "system": "Be brief."}, "system.*not a raw prompt"),
    ({"items": [{"messages": USER}], "kind": "image"}, "text jobs"),
    ({"items": [{"messages": [{"role": "user", "content": "x" * 50}]}]}, "over the limit of 40"),
])
def test_bad_chat_items_are_refused_naming_the_item(job, match):
    with pytest.raises(SpecError, match=match):
        spec = parse_spec({"kind": "text", "model": "m", **job})
        check_limits(spec, Limits(max_prompt_bytes=40), {})


def test_chat_items_come_from_jsonl_items_files_and_job_yaml(tmp_path):
    jsonl = tmp_path / "items.jsonl"
    jsonl.write_text(json.dumps({"custom_id": "a", "messages": USER}) + "\n")
    (item,) = load_items_jsonl(jsonl)
    assert _spec([item]).items[0].messages[0].content == USER[0]["content"]
    job = tmp_path / "job.yaml"
    job.write_text("kind: text\nmodel: m\nsystem: You write headlines.\nparams: {stop: [END]}\nitems:\n"
                   "  - messages:\n      - {role: user, content: Storm closes the harbour road}\n")
    spec = parse_spec(load_yaml(job))
    assert spec.system == "You write headlines." and spec.items[0].messages[0].role == "user"


def test_an_unset_system_leaves_the_payload_digest_as_before():
    spec = _spec(["a"])
    # reuse (issue 16) is left out while off, as system is while unset.
    body = spec.model_dump(mode="json", exclude={"idempotency_key", "system", "reuse"}, by_alias=True)
    for it in body["items"]:
        del it["messages"]
    raw = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert spec.payload_digest() == hashlib.sha256(raw.encode()).hexdigest()
    assert _spec(["a"], system="x").payload_digest() != spec.payload_digest()


# ---- end to end, embedded ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chat_dirs(tmp_path_factory, one_torch_thread):
    root = tmp_path_factory.mktemp("models")
    return build_chat_model(root / "chatml"), build_chat_model(root / "no-template", template=False)


@pytest.fixture
def chat_client(client, chat_dirs):
    client.register_model("chat", "text", chat_dirs[0].as_uri())
    client.register_model("plain", "text", chat_dirs[1].as_uri())
    return client


def test_messages_are_refused_at_submit_for_a_model_without_a_template(chat_client):
    with pytest.raises(SpecError, match=r"items\[1\].messages: model plain@1 has no chat template"):
        chat_client.submit("text", model="plain", items=["a prompt", {"messages": USER}])
    with pytest.raises(SpecError, match="no chat template"):
        chat_client.submit("text", model="plain", items=[{"messages": USER}], system="Be brief.")
    assert chat_client.jobs() == []  # nothing written


def test_a_registry_template_lets_a_model_without_one_take_messages(chat_client, chat_dirs):
    chat_client.register_model("plain-chat", "text", chat_dirs[1].as_uri(), defaults={"chat_template": CHATML})
    job = chat_client.submit("text", model="plain-chat", items=[{"messages": USER}], params={"max_new_tokens": 30},
                             seed=1)
    view = chat_client.wait(job.id, timeout=120)
    assert view.status == JobStatus.succeeded
    (r,) = list(chat_client.results(job.id))
    assert r.provenance["chat_template_sha256"] == hashlib.sha256(CHATML.encode()).hexdigest()
    assert "chat_template" not in r.provenance["params"]  # a model setting, not a generation parameter


def test_a_chat_job_runs_end_to_end_and_ends_at_the_end_of_turn_token(chat_client):
    items = [{"custom_id": f"h{i}", "messages": [{"role": "user", "content": f"Headline {i}"}]} for i in range(3)]
    job = chat_client.submit("text", model="chat", items=items, system="You write headlines.",
                             params={"max_new_tokens": 40, "top_k": 0}, seed=1)
    with chat_client.db.session() as s:
        stored = s.query(Item).filter_by(job_id=job.id, index=0).one().messages
    assert stored == [{"role": "system", "content": "You write headlines."}, items[0]["messages"][0]]
    view = chat_client.wait(job.id, timeout=120)
    assert view.status == JobStatus.succeeded and view.counts["succeeded"] == 3
    results = list(chat_client.results(job.id))
    for r in results:
        p = r.provenance
        assert p["output"]["finish_reason"] == "stop" and 0 <= p["output"]["new_tokens"] < 40
        assert p["params"]["top_k"] == 0 and p["param_sources"]["top_k"] == "job"
        assert p["params"]["temperature"] == CHECKPOINT_SAMPLING["temperature"]
        assert p["param_sources"]["temperature"] == "checkpoint"
        assert p["params"]["max_new_tokens"] == 40 and p["param_sources"]["max_new_tokens"] == "job"
        assert p["param_sources"]["echo"] == "default"
        rendered = (f"<|im_start|>system\nYou write headlines.<|im_end|>\n<|im_start|>user\nHeadline {r.index}"
                    "<|im_end|>\n<|im_start|>assistant\n")
        assert p["prompt_sha256"] == hashlib.sha256(rendered.encode()).hexdigest()
        assert p["chat_template_sha256"] == hashlib.sha256(CHATML.encode()).hexdigest()
        assert "params" not in p["output"] and "prompt_sha256" not in p["output"]


def test_registry_defaults_sit_between_the_job_and_the_checkpoint(chat_client, chat_dirs):
    chat_client.register_model("chat-cool", "text", chat_dirs[0].as_uri(), defaults={"temperature": 0.3})
    job = chat_client.submit("text", model="chat-cool", items=[{"messages": USER, "params": {"top_p": 0.5}}],
                             params={"max_new_tokens": 5})
    chat_client.wait(job.id, timeout=120)
    (r,) = list(chat_client.results(job.id))
    sources = r.provenance["param_sources"]
    assert (sources["temperature"], sources["top_p"], sources["top_k"], sources["stop"]) == (
        "registry", "item", "checkpoint", "default")
    assert r.provenance["params"]["temperature"] == 0.3 and r.provenance["params"]["top_p"] == 0.5


def test_a_from_item_of_a_job_with_system_is_a_chat_item_with_that_text_as_the_user_message(chat_client):
    first = chat_client.submit("text", model="tiny", items=[{"custom_id": "a", "prompt": "Headline: x\n\n"}],
                               params={"max_new_tokens": 6}, seed=3)
    chat_client.wait(first.id, timeout=120)
    (src,) = list(chat_client.results(first.id))
    text = chat_client.store.get(src.key).decode()
    job = chat_client.submit("text", model="chat", items=[{"from": {"job": first.id, "custom_id": "a"}}],
                             system="Summarise.", params={"max_new_tokens": 5})
    assert chat_client.wait(job.id, timeout=120).status == JobStatus.succeeded
    (r,) = list(chat_client.results(job.id))
    rendered = (f"<|im_start|>system\nSummarise.<|im_end|>\n<|im_start|>user\n{text}<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert r.provenance["prompt_sha256"] == hashlib.sha256(rendered.encode()).hexdigest()
    # A plain "from" item (no system) still takes the text as its prompt.
    plain = chat_client.submit("text", model="tiny", items=[{"from": {"job": first.id, "custom_id": "a"}}],
                               params={"max_new_tokens": 2})
    assert chat_client.wait(plain.id, timeout=120).status == JobStatus.succeeded
    (p,) = list(chat_client.results(plain.id))
    assert p.provenance["prompt_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert "chat_template_sha256" not in p.provenance


def test_stop_strings_run_end_to_end(chat_client):
    job = chat_client.submit("text", model="tiny", items=["Headline: Council\n\n"] * 2,
                             params={"max_new_tokens": 30, "stop_at_eos": False}, seed=5)
    chat_client.wait(job.id, timeout=120)
    full = chat_client.store.get(next(iter(chat_client.results(job.id))).key).decode()
    stop = next(full[k : k + 3] for k in range(8, len(full) - 3) if full[k : k + 3].strip())
    cut = chat_client.submit("text", model="tiny", items=["Headline: Council\n\n"],
                             params={"max_new_tokens": 30, "stop_at_eos": False, "stop": [stop]}, seed=5)
    chat_client.wait(cut.id, timeout=120)
    (r,) = list(chat_client.results(cut.id))
    assert chat_client.store.get(r.key).decode() == full[: full.find(stop)]
    assert r.provenance["output"]["finish_reason"] == "stop" and r.provenance["params"]["stop"] == [stop]


def test_the_cli_submits_a_chat_job_yaml_and_refuses_messages_for_a_model_without_a_template(tmp_path, chat_dirs):
    from scheduler import Client
    from tests.unit.test_cli import Cli

    cli = Cli(tmp_path)
    for name, path in (("chat", chat_dirs[0]), ("plain", chat_dirs[1])):
        assert cli("models", "register", name, path.as_uri()).returncode == 0
    job = tmp_path / "job.yaml"
    job.write_text("kind: text\nmodel: chat\nsystem: You write one-line headlines.\nseed: 2\n"
                   "params: {max_new_tokens: 40}\nitems:\n"
                   "  - custom_id: h1\n    messages:\n      - {role: user, content: Council approves the budget}\n")
    r = cli("submit", job)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    assert cli("wait", job_id).returncode == 0
    client = Client(database_url=f"sqlite:///{cli.db_path}", storage_url=f"file://{tmp_path}/data", broker_url=None)
    (res,) = list(client.results(job_id))
    assert res.provenance["output"]["finish_reason"] == "stop"
    assert res.provenance["chat_template_sha256"] == hashlib.sha256(CHATML.encode()).hexdigest()

    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"custom_id": "a", "messages": USER}) + "\n")
    r = cli("submit", "--items", items, "--model", "plain")
    assert r.returncode != 0 and "has no chat template" in r.stderr and "Traceback" not in r.stderr
