"""Submit-time validation: every refusal is a SpecError that names what to fix and writes nothing."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from aigc_core.errors import IdempotencyConflict, SpecError
from aigc_core.schema import Chunk, Item, Job, JobEvent
from aigc_core.settings import Limits
from aigc_core.spec import JobSpec, check_limits, parse_spec


def _counts(client) -> dict[str, int]:
    with client.db.session() as s:
        return {t.__name__: s.scalar(select(func.count()).select_from(t)) for t in (Job, Item, Chunk, JobEvent)}


NOTHING = {"Job": 0, "Item": 0, "Chunk": 0, "JobEvent": 0}


def _refused(client, *args, **kwargs) -> SpecError:
    """Submit, expect a SpecError, and check that no job, item, chunk or event row was written."""
    with pytest.raises(SpecError) as info:
        client.submit(*args, **kwargs)
    assert _counts(client) == NOTHING
    return info.value


@pytest.fixture
def limited_client(sqlite_settings, tiny_text_model):
    """A client factory with the tiny model registered and the given limits."""
    from scheduler import Client

    def make(**limits) -> Client:
        settings = sqlite_settings.model_copy(update={"limits": Limits(**limits)})
        c = Client(settings)
        c.register_model("tiny", "text", tiny_text_model.as_uri(), defaults={"max_new_tokens": 8})
        return c

    return make


# ---- refusals -----------------------------------------------------------------------------------

def test_unknown_model_is_refused_naming_the_known_models_and_nothing_is_written(client, tiny_text_model):
    client.register_model("other", "text", tiny_text_model.as_uri())
    e = _refused(client, "text", model="nope", items=["a headline"])
    assert "nope" in str(e)
    assert "tiny" in str(e) and "other" in str(e)


def test_unknown_version_of_a_known_model_is_refused(client):
    e = _refused(client, "text", model="tiny@7", items=["a headline"])
    assert "tiny@7" in str(e)


def test_job_with_no_items_is_refused_and_nothing_is_written(client):
    e = _refused(client, "text", model="tiny", items=[])
    assert "items" in str(e)


def test_duplicate_custom_id_is_refused_naming_both_indexes_and_nothing_is_written(client):
    items = [{"custom_id": "a", "prompt": "x"}, {"custom_id": "b", "prompt": "y"},
             {"custom_id": "a", "prompt": "z"}]
    e = _refused(client, "text", model="tiny", items=items)
    msg = str(e)
    assert "items[2]" in msg and "items[0]" in msg
    assert "'a'" in msg


def test_explicit_custom_id_colliding_with_a_default_index_id_is_refused(client):
    # An item without custom_id is known by its index; "0" given explicitly to item 1 collides.
    e = _refused(client, "text", model="tiny", items=[{"prompt": "x"}, {"custom_id": "0", "prompt": "y"}])
    assert "items[1]" in str(e) and "items[0]" in str(e)


def test_prompt_over_the_byte_limit_is_refused_and_nothing_is_written(limited_client):
    c = limited_client(max_prompt_bytes=50)
    # 30 characters but 60 bytes: the limit counts UTF-8 bytes, not characters.
    e = _refused(c, "text", model="tiny", items=["ok", "é" * 30])
    assert "items[1].prompt" in str(e)
    assert "60 bytes" in str(e) and "50" in str(e)


def test_prompt_exactly_at_the_byte_limit_is_accepted(limited_client):
    c = limited_client(max_prompt_bytes=50)
    job = c.submit("text", model="tiny", items=["x" * 50])
    assert job.item_count == 1


def test_job_max_new_tokens_over_the_limit_is_refused_and_nothing_is_written(limited_client):
    c = limited_client(max_new_tokens=16)
    e = _refused(c, "text", model="tiny", items=["a", "b"], params={"max_new_tokens": 17})
    assert "max_new_tokens" in str(e) and "16" in str(e)


def test_item_max_new_tokens_over_the_limit_is_refused_naming_the_item(limited_client):
    c = limited_client(max_new_tokens=16)
    items = [{"prompt": "a"}, {"prompt": "b", "params": {"max_new_tokens": 100}}]
    e = _refused(c, "text", model="tiny", items=items, params={"max_new_tokens": 16})
    assert "items[1]" in str(e) and "max_new_tokens" in str(e)


def test_unknown_param_name_is_refused_naming_it(client):
    e = _refused(client, "text", model="tiny", items=["a"], params={"temprature": 0.5})
    assert "temprature" in str(e)


def test_unknown_item_param_name_is_refused_naming_the_item(client):
    items = ["a", {"prompt": "b", "params": {"beams": 4}}]
    e = _refused(client, "text", model="tiny", items=items)
    assert "items[1].params" in str(e) and "beams" in str(e)


def test_param_of_the_wrong_type_is_refused_naming_it(client):
    e = _refused(client, "text", model="tiny", items=["a"], params={"temperature": "hot"})
    assert "params.temperature" in str(e)


def test_param_out_of_range_is_refused(client):
    e = _refused(client, "text", model="tiny", items=["a"], params={"top_p": 0})
    assert "top_p" in str(e)


def test_image_job_on_a_text_model_is_refused_and_nothing_is_written(client):
    e = _refused(client, "image", model="tiny", items=["a cat"])
    assert "text" in str(e) and "image" in str(e)


def test_unknown_kind_is_refused(client):
    e = _refused(client, "video", model="tiny", items=["a"])
    assert "kind" in str(e)


def test_more_items_than_the_job_limit_are_refused_and_nothing_is_written(limited_client):
    c = limited_client(max_items_per_job=3)
    e = _refused(c, "text", model="tiny", items=["a", "b", "c", "d"])
    assert "4 items" in str(e) and "3" in str(e)


def test_items_exactly_at_the_job_limit_are_accepted(limited_client):
    c = limited_client(max_items_per_job=3)
    assert c.submit("text", model="tiny", items=["a", "b", "c"]).item_count == 3


def test_item_without_a_prompt_is_refused(client):
    e = _refused(client, "text", model="tiny", items=[{"custom_id": "a"}])
    assert "prompt" in str(e)


def test_unknown_field_in_the_spec_is_refused(client):
    e = _refused(client, {"kind": "text", "model": "tiny", "items": ["a"], "temperature": 0.3})
    assert "temperature" in str(e)


def test_refused_submit_after_a_good_one_leaves_the_good_job_alone(client):
    client.submit("text", model="tiny", items=["a", "b"])
    before = _counts(client)
    with pytest.raises(SpecError):
        client.submit("text", model="tiny", items=["a", "a" * 10, {"prompt": "c", "params": {"bad": 1}}])
    assert _counts(client) == before


# ---- idempotency --------------------------------------------------------------------------------

def test_same_idempotency_key_and_payload_returns_the_same_job_once(client):
    a = client.submit("text", model="tiny", items=["a", "b"], seed=5, idempotency_key="nightly-1")
    b = client.submit("text", model="tiny", items=["a", "b"], seed=5, idempotency_key="nightly-1")
    assert a.id == b.id
    counts = _counts(client)
    assert counts["Job"] == 1 and counts["Item"] == 2


def test_same_idempotency_key_without_a_seed_still_returns_the_same_job(client):
    # The seed is drawn at write time; it must not make the second payload look different.
    a = client.submit("text", model="tiny", items=["a"], idempotency_key="k")
    b = client.submit("text", model="tiny", items=["a"], idempotency_key="k")
    assert a.id == b.id and _counts(client)["Job"] == 1


def test_same_idempotency_key_with_a_different_payload_is_a_conflict(client):
    a = client.submit("text", model="tiny", items=["a", "b"], idempotency_key="nightly-1")
    with pytest.raises(IdempotencyConflict) as info:
        client.submit("text", model="tiny", items=["a", "c"], idempotency_key="nightly-1")
    assert isinstance(info.value, SpecError)
    assert "nightly-1" in str(info.value) and a.id in str(info.value)
    counts = _counts(client)
    assert counts["Job"] == 1 and counts["Item"] == 2


def test_different_idempotency_keys_make_different_jobs(client):
    a = client.submit("text", model="tiny", items=["a"], seed=1, idempotency_key="k1")
    b = client.submit("text", model="tiny", items=["a"], seed=1, idempotency_key="k2")
    assert a.id != b.id and _counts(client)["Job"] == 2


# ---- what a good submit writes -------------------------------------------------------------------

def test_valid_submit_writes_items_with_fixed_seeds_and_one_chunk_row_per_chunk(client):
    # chunk_size is 4 in sqlite_settings: 10 items make chunks 0,0,0,0,1,1,1,1,2,2.
    items = [{"custom_id": f"h{i}", "prompt": f"headline {i}"} for i in range(10)]
    job = client.submit("text", model="tiny", items=items, seed=1000)
    assert job.item_count == 10 and job.status.value == "queued" and job.model == "tiny@1"
    with client.db.session() as s:
        row = s.get(Job, job.id)
        assert row.seed == 1000 and row.chunk_size == 4
        got = s.execute(select(Item.index, Item.custom_id, Item.seed, Item.chunk_no, Item.status)
                        .where(Item.job_id == job.id).order_by(Item.index)).all()
        chunks = s.execute(select(Chunk.chunk_no, Chunk.status).where(Chunk.job_id == job.id)
                           .order_by(Chunk.chunk_no)).all()
    assert [(r.index, r.custom_id, r.seed, r.chunk_no) for r in got] == [
        (i, f"h{i}", 1000 + i, i // 4) for i in range(10)
    ]
    assert {r.status.value for r in got} == {"pending"}
    assert [c.chunk_no for c in chunks] == [0, 1, 2]
    assert {c.status.value for c in chunks} == {"pending"}


def test_chunk_size_given_at_submit_overrides_the_setting(client):
    job = client.submit("text", model="tiny", items=[str(i) for i in range(5)], seed=0, chunk_size=2)
    with client.db.session() as s:
        nos = s.scalars(select(Item.chunk_no).where(Item.job_id == job.id).order_by(Item.index)).all()
        n_chunks = s.scalar(select(func.count()).select_from(Chunk).where(Chunk.job_id == job.id))
    assert nos == [0, 0, 1, 1, 2] and n_chunks == 3


def test_plain_strings_are_accepted_as_prompts_with_index_custom_ids(client):
    job = client.submit("text", model="tiny", items=["first", "second"], seed=7)
    with client.db.session() as s:
        rows = s.execute(select(Item.custom_id, Item.prompt, Item.seed).where(Item.job_id == job.id)
                         .order_by(Item.index)).all()
    assert [tuple(r) for r in rows] == [("0", "first", 7), ("1", "second", 8)]


def test_spec_given_as_a_dict_is_accepted(client):
    job = client.submit({"kind": "text", "model": "tiny", "items": [{"prompt": "x"}], "seed": 3})
    assert job.item_count == 1


# ---- aigc_core.spec directly -------------------------------------------------------------------

def test_parse_spec_refuses_data_that_is_not_a_mapping():
    with pytest.raises(SpecError, match="mapping"):
        parse_spec(["text", "tiny"])


def test_parse_spec_error_names_the_field():
    with pytest.raises(SpecError) as info:
        parse_spec({"kind": "text", "model": "tiny", "items": [{"prompt": "a"}], "seed": -1})
    assert "seed" in str(info.value)


def test_payload_digest_ignores_the_idempotency_key_but_not_the_items():
    base = {"kind": "text", "model": "tiny", "items": [{"prompt": "a"}]}
    a = parse_spec({**base, "idempotency_key": "k1"})
    b = parse_spec({**base, "idempotency_key": "k2"})
    c = parse_spec({**base, "items": [{"prompt": "b"}]})
    assert a.payload_digest() == b.payload_digest() != c.payload_digest()


def test_check_limits_validates_model_defaults_merged_with_job_params():
    # A model default above the limit is refused too, since it is what the item would run with.
    spec = JobSpec(kind="text", model="tiny", items=[{"prompt": "a"}])
    with pytest.raises(SpecError, match="max_new_tokens"):
        check_limits(spec, Limits(max_new_tokens=10), {"max_new_tokens": 11})
    check_limits(spec, Limits(max_new_tokens=10), {"max_new_tokens": 10})


def test_text_with_a_lone_surrogate_is_a_spec_error_not_a_crash():
    """Found by the CLI fuzz test: JSON may escape a lone surrogate ("\\ud800"), which no database or
    digest can encode as UTF-8."""
    import json

    for item in ('{"prompt": "\\ud800"}', '{"prompt": "ok", "params": {"x\\ud83d": 1}}',
                 '{"prompt": "ok", "params": {"stop": ["\\udfff"]}}'):
        with pytest.raises(SpecError, match="not valid Unicode"):
            parse_spec({"kind": "text", "model": "m", "items": [json.loads(item)]})


# ---- items must be a list (issue 18) --------------------------------------------------------------

@pytest.mark.parametrize("items", ["prompt", b"prompt", {"prompt": "x"}, {"custom_id": "a", "prompt": "x"}])
def test_a_string_bytes_or_a_mapping_is_not_a_list_of_items(client, items):
    # A str is iterable: it used to become one item per character ("p", "r", "o", "m", "p", "t").
    e = _refused(client, "text", model="tiny", items=items)
    assert "items" in str(e) and "list" in str(e) and type(items).__name__ in str(e)


@pytest.mark.parametrize("items", ["prompt", b"prompt", {"prompt": "x"}])
def test_a_spec_whose_items_are_not_a_list_is_refused_naming_the_type(client, items):
    e = _refused(client, {"kind": "text", "model": "tiny", "items": items})
    assert "items" in str(e) and "list" in str(e) and type(items).__name__ in str(e)
    with pytest.raises(SpecError, match="items: expected a list"):
        parse_spec({"kind": "text", "model": "tiny", "items": items})


def test_a_tuple_or_a_generator_of_items_is_still_accepted(client):
    assert client.submit("text", model="tiny", items=("a", "b")).item_count == 2
    assert client.submit("text", model="tiny", items=(f"p{i}" for i in range(3))).item_count == 3


# ---- YAML scalars (issue 18) ----------------------------------------------------------------------

@pytest.mark.parametrize("text, value", [
    ("5e-4", 5e-4), ("1E5", 1e5), ("-2.5e+3", -2500.0), (".5e-1", 0.05), ("0.8", 0.8), ("20", 20),
    ("true", True), ("false", False), ("null", None), ("en-us", "en-us"), ("1e", "1e"), ("e5", "e5"),
    ("Headline: x", "Headline: x"), ("'5e-4'", "5e-4"),
])
def test_parse_scalar_reads_numbers_as_yaml_1_2_does(text, value):
    from aigc_core.spec import parse_scalar

    got = parse_scalar(text)
    assert got == value and type(got) is type(value)


def test_a_job_file_reads_exponent_floats_as_numbers(tmp_path):
    from aigc_core.spec import load_yaml

    path = tmp_path / "job.yaml"
    path.write_text("params: {temperature: 7e-1, top_p: 9.5e-1, name: 5e-4x}\n")
    assert load_yaml(path) == {"params": {"temperature": 0.7, "top_p": 0.95, "name": "5e-4x"}}


@pytest.mark.parametrize("items", [True, 3, 2.5, object()])
def test_items_that_are_not_a_list_at_all_are_refused_by_name(items):
    from aigc_core.spec import check_items_container

    with pytest.raises(SpecError, match="items: expected a list of items"):
        check_items_container(items)
