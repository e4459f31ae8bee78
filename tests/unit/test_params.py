"""One typed parameter contract per backend: declared once in aigc_models/params.py, validated by the
spec by backend name without torch, and the defaults every backend runs with; provenance records the
values that ran and where each came from, for images and audio as for text."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from aigc_core.errors import SpecError
from aigc_core.settings import Limits
from aigc_core.spec import ModelFacts, check_limits, check_model_fit, params_schema, parse_spec
from aigc_models import GenRequest, params
from aigc_models.base import BACKENDS, Backend, BackendError


def _backend_class(target: str) -> type:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _generator_classes() -> dict[tuple[str, str | None], type]:
    """Every generator class by (backend, model_type): hf-tts picks one per model_type."""
    from aigc_models.audio import ARCHITECTURES

    out: dict[tuple[str, str | None], type] = {}
    for name, target in BACKENDS.items():
        if name == "hf-tts":
            out.update({(name, arch): _backend_class(t) for arch, t in ARCHITECTURES.items()})
        else:
            out[(name, None)] = _backend_class(target)
    return out


KIND_OF = {"hf-causal-lm": "text", "diffusers": "image", "digits": "image", "hf-tts": "audio", "espeak": "audio"}


def test_each_backend_runs_with_the_contract_the_spec_validates_its_jobs_against():
    for (backend, arch), cls in _generator_classes().items():
        assert issubclass(cls, Backend), cls
        assert cls.Params is params_schema(KIND_OF[backend], backend, arch), (backend, arch)
    from aigc_models.audio import ARCHITECTURES

    assert set(ARCHITECTURES) == set(params.BY_ARCHITECTURE["hf-tts"])


@pytest.mark.parametrize("module", ["text", "image", "audio", "musicgen", "speecht5"])
def test_no_backend_module_keeps_a_defaults_or_limits_table_of_its_own(module):
    mod = importlib.import_module(f"aigc_models.{module}")
    tables = [n for n, v in vars(mod).items() if isinstance(v, dict) and n.endswith(("_DEFAULTS", "_LIMITS"))]
    assert tables == []


@pytest.mark.parametrize("backend", ["diffusers", "digits", "espeak"])
def test_a_request_that_sets_nothing_runs_with_the_declared_project_defaults(backend):
    cls = _generator_classes()[(backend, None)]
    gen = object.__new__(cls)  # effective() needs no model: these backends take nothing from a checkpoint
    gen.default_voice = None  # espeak's builtin://espeak-<voice>; none here
    values, sources = gen.effective(GenRequest(0, "", {}, 0))
    assert values == cls.Params.project_defaults()
    assert set(sources.values()) <= {"default", "checkpoint"}


@pytest.mark.parametrize(("backend", "bad"), [
    ("espeak", {"rate": 20}), ("diffusers", {"eta": 2.0}), ("digits", {"size": 4}),
    ("hf-causal-lm", {"top_p": 0}),
])
def test_the_spec_and_the_backend_refuse_the_same_out_of_range_value(backend, bad):
    kind = KIND_OF[backend]
    spec = parse_spec({"kind": kind, "model": "m", "items": [{"prompt": "x"}], "params": bad})
    with pytest.raises(SpecError, match=next(iter(bad))):
        check_model_fit(spec, ModelFacts("m@1", kind, backend))
    gen = object.__new__(_generator_classes()[(backend, None)])
    gen.checkpoint = {}  # the text backend's generation_config values
    with pytest.raises(BackendError, match=next(iter(bad))):
        gen.effective(GenRequest(0, "x", bad, 0))


@pytest.mark.parametrize(("backend", "arch", "foreign"), [
    ("hf-causal-lm", None, {"voice": "en"}), ("hf-tts", "vits", {"duration": 2.0}),
    ("hf-tts", "musicgen", {"speaking_rate": 1.2}), ("digits", None, {"height": 64}),
])
def test_a_parameter_the_models_backend_does_not_take_is_refused_at_submit(backend, arch, foreign):
    kind = KIND_OF[backend]
    spec = parse_spec({"kind": kind, "model": "m", "items": [{"prompt": "x", "params": foreign}]})
    if kind != "text":
        check_limits(spec, Limits(), {})  # another backend of the kind takes it
    with pytest.raises(SpecError, match=rf"items\[0\]\.params\.{next(iter(foreign))}.*model m@1"):
        check_model_fit(spec, ModelFacts("m@1", kind, backend, arch))


def test_a_plugin_backend_is_held_to_every_parameter_of_its_kind():
    spec = parse_spec({"kind": "audio", "model": "m", "items": [{"prompt": "x"}],
                       "params": {"voice": "en", "duration": 2}})
    check_model_fit(spec, ModelFacts("m@1", "audio", "my-plugin"))
    with pytest.raises(SpecError, match="nope"):
        check_model_fit(parse_spec({"kind": "audio", "model": "m", "items": [{"prompt": "x"}], "params": {"nope": 1}}),
                        ModelFacts("m@1", "audio", "my-plugin"))


def test_musicgen_duration_over_the_audio_limit_is_refused_at_submit():
    spec = parse_spec({"kind": "audio", "model": "m", "items": [{"prompt": "lo-fi"}], "params": {"duration": 30}})
    check_limits(spec, Limits(max_audio_seconds=60), {})
    with pytest.raises(SpecError, match=r"params\.duration: 30 s is over the limit of 20 s"):
        check_limits(spec, Limits(max_audio_seconds=20), {})
    with pytest.raises(SpecError, match=r"params\.duration: 30 s is over the limit of 20 s"):  # a registry default
        check_limits(parse_spec({"kind": "audio", "model": "m", "items": [{"prompt": "x"}]}),
                     Limits(max_audio_seconds=20), {"duration": 30})


def test_the_contract_and_the_spec_import_no_torch():
    code = ("import sys\n"
            "from aigc_core.spec import TextParams, params_schema\n"
            "from aigc_core import registry\n"
            "assert params_schema('audio', 'hf-tts', 'musicgen').project_defaults()['duration'] == 8.0\n"
            "assert TextParams.project_defaults()['max_new_tokens'] == 128\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- provenance: the parameters that ran, and where each came from ---------------------------------

def test_image_provenance_records_the_effective_parameters_and_their_sources(sqlite_settings):
    from scheduler import Client

    client = Client(sqlite_settings.model_copy(update={"torch_threads": 1}))
    client.register_model("digits-inverted", "image", "builtin://demo-digits", backend="digits",
                          defaults={"invert": True})
    job = client.submit("image", model="digits-inverted", items=[{"params": {"digit": 3}}, {"prompt": "seven"}],
                        params={"size": 16}, seed=1)
    assert client.wait(job.id, timeout=300).status.value == "succeeded"
    first, second = sorted(client.results(job.id), key=lambda r: r.index)
    for r in (first, second):
        p, src = r.provenance["params"], r.provenance["param_sources"]
        assert p["invert"] is True and src["invert"] == "registry"
        assert p["size"] == 16 and src["size"] == "job"
        assert p["temperature"] == 1.0 and src["temperature"] == "default"
        assert p["resample"] == "nearest" and src["resample"] == "default"
    assert first.provenance["params"]["digit"] == 3 and first.provenance["param_sources"]["digit"] == "item"
    assert second.provenance["params"]["digit"] is None and second.provenance["output"]["digit"] == 7


def test_audio_provenance_records_the_effective_parameters_and_their_sources(sqlite_settings):
    from scheduler import Client

    client = Client(sqlite_settings)
    job = client.submit("audio", model="espeak-en", items=["Hello.", {"text": "Hi.", "params": {"pitch": 70}}],
                        params={"rate": 200}, seed=1)
    assert client.wait(job.id, timeout=120).status.value == "succeeded"
    first, second = sorted(client.results(job.id), key=lambda r: r.index)
    assert first.provenance["params"] == {"voice": "en", "rate": 200, "pitch": 50}
    assert first.provenance["param_sources"] == {"voice": "checkpoint", "rate": "job", "pitch": "default"}
    assert second.provenance["params"]["pitch"] == 70 and second.provenance["param_sources"]["pitch"] == "item"
