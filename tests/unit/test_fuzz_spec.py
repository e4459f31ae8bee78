"""Fuzzed input: the spec validator answers arbitrary JSON with a SpecError or a valid spec, never a crash."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aigc_core.errors import SpecError
from aigc_core.jobs import item_key, job_prefix
from aigc_core.schema import new_id
from aigc_core.settings import Limits
from aigc_core.spec import JobSpec, check_limits, parse_spec

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
    key = item_key(job_id, index, ext)
    assert key.startswith(job_prefix(job_id) + "/items/") and ".." not in key and "//" not in key
