"""Fuzzed input: the spec validator answers arbitrary JSON with a SpecError or a valid spec, never a crash."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aigc_core.errors import SpecError
from aigc_core.jobs import item_key, job_prefix, sidecar_of
from aigc_core.schema import new_id
from aigc_core.settings import Limits
from aigc_core.spec import JobSpec, check_limits, load_items_jsonl, load_yaml, parse_spec

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
spec_like = st.fixed_dictionaries(
    {},
    optional={
        "kind": st.sampled_from(["text", "image", "audio", "video", 3]),
        "model": st.text(max_size=10) | st.integers(),
        "items": st.lists(st.one_of(json_values, st.fixed_dictionaries(
            {"prompt": st.text(max_size=30)},
            optional={"custom_id": st.text(max_size=8), "params": st.dictionaries(
                st.sampled_from(["max_new_tokens", "temperature", "top_p", "bogus", "height", "rate"]),
                json_values, max_size=3)})), max_size=5),
        "params": st.dictionaries(st.sampled_from(["max_new_tokens", "temperature", "nope"]), json_values),
        "seed": json_values,
        "metadata": json_values,
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(json_values, spec_like))
def test_arbitrary_json_gives_a_spec_error_with_a_message_or_a_valid_spec(data):
    try:
        spec = parse_spec(data)
        check_limits(spec, Limits(), {})
    except SpecError as e:
        assert str(e).strip()
        return
    # accepted: it survives the message round trip unchanged
    again = JobSpec.model_validate(json.loads(json.dumps(spec.model_dump(mode="json", by_alias=True))))
    assert again == spec and again.payload_digest() == spec.payload_digest()


@given(st.integers(min_value=0, max_value=10**9), st.sampled_from(["txt", "png", "wav", "json"]))
def test_object_keys_come_from_server_ids_and_stay_under_the_job_prefix(index, ext):
    job_id = new_id()
    key = item_key(job_id, index, ext, new_id())
    assert key.startswith(job_prefix(job_id) + "/items/") and ".." not in key and "//" not in key
    assert sidecar_of(key) == key.removesuffix(f".{ext}") + ".provenance.json" != key


small = Limits(max_items_per_job=4, max_prompt_bytes=40, max_new_tokens=16, max_custom_id_chars=6,
               max_metadata_bytes=60, max_image_pixels=64 * 64, max_inference_steps=5, max_tts_chars=30)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 7), prompt=st.text(min_size=1, max_size=60),
       cid=st.text(st.characters(categories=["L", "N", "P"]), min_size=1, max_size=9),
       tokens=st.integers(1, 40), meta=st.text(max_size=80))
def test_limits_hold_exactly_at_their_edges(n, prompt, cid, tokens, meta):
    items = [{"prompt": prompt, "custom_id": f"{cid}{i}"} for i in range(n)]
    spec = parse_spec({"kind": "text", "model": "m", "items": items, "params": {"max_new_tokens": tokens},
                       "metadata": {"m": meta}})
    within = (1 <= n <= small.max_items_per_job and len(prompt.encode()) <= small.max_prompt_bytes
              and all(len(f"{cid}{i}") <= small.max_custom_id_chars for i in range(n))
              and tokens <= small.max_new_tokens and len(json.dumps({"m": meta}).encode()) <= small.max_metadata_bytes)
    try:
        check_limits(spec, small, {})
    except SpecError as e:
        assert not within, f"refused within the limits: {e}"
        return
    assert within, "accepted over a limit"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=200).map(str.encode))
def test_any_bytes_as_a_yaml_or_items_file_give_data_or_a_spec_error(tmp_path_factory, raw):
    path = tmp_path_factory.getbasetemp() / "fuzz-input"
    path.write_bytes(raw)
    try:
        data = load_yaml(path)
        json.dumps(data, allow_nan=True)  # what a job file gives is JSON: it can be stored as it is
    except SpecError as e:
        assert str(e).strip() and "\n" not in str(e)
    try:
        items = load_items_jsonl(path)
        assert all(isinstance(i, dict) for i in items)
    except SpecError as e:
        assert str(e).strip() and "\n" not in str(e)
