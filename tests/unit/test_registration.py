"""Registration that checks: a model the workers could not fetch or load is refused in one line with
nothing written; the context length is recorded and submit keeps prompt + max_new_tokens within it;
``aigc submit --model`` takes the kind from the registry."""

from __future__ import annotations

import json
import shutil

import pytest

from aigc_core.errors import SpecError
from tests.unit.test_cli import Cli, _write


def _versions(client) -> list[str]:
    return sorted(m["tag"] for m in client.models())


def _refused(client, match: str, *args, **kw) -> str:
    before = _versions(client)
    with pytest.raises(SpecError, match=match) as e:
        client.register_model(*args, **kw)
    assert _versions(client) == before  # nothing written
    assert "\n" not in str(e.value)
    return str(e.value)


def _checkpoint(path, config: dict | None = None, weights: str = "model.safetensors"):
    path.mkdir(parents=True)
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    if weights:
        (path / weights).write_bytes(b"not read at registration")
    return path


@pytest.mark.parametrize(("uri", "match"), [
    ("http://x/y", r"not http://"), ("hf://org/name@main", r"not hf://: download it"),
    ("/models/house", "a path without a scheme"), ("ftp://host/m", "not ftp://"),
])
def test_a_uri_scheme_the_loader_cannot_fetch_is_refused(client, uri, match):
    msg = _refused(client, match, "foo", "text", uri)
    assert "file://, s3:// or builtin://" in msg


def test_a_missing_directory_is_refused(client, tmp_path):
    _refused(client, "does not exist", "foo", "text", (tmp_path / "nowhere").as_uri())


def test_builtin_is_only_for_the_backends_that_make_their_own(client):
    _refused(client, "no built-in models", "foo", "text", "builtin://demo-digits")
    assert client.register_model("digits2", "image", "builtin://demo-digits", backend="digits").version == 1


@pytest.mark.parametrize(("kind", "backend", "config", "match"), [
    ("text", None, {"model_type": "bert", "architectures": ["BertForMaskedLM"]}, "not a causal language model"),
    ("text", None, None, "no config.json"),
    ("text", None, {"model_type": "vits", "architectures": ["VitsModel"]}, "a vits checkpoint is an audio model: "
                                                                           "--kind audio"),
    ("audio", None, {"model_type": "bark"}, r"'bark' is not supported by the hf-tts backend \(supported: vits, "
                                             "musicgen, speecht5\\)"),
    ("audio", None, {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "'gpt2' is not supported"),
    ("image", None, {"model_type": "gpt2"}, "no model_index.json"),
])
def test_an_architecture_the_backend_does_not_run_is_refused(client, tmp_path, kind, backend, config, match):
    path = _checkpoint(tmp_path / "m", config)
    _refused(client, match, "foo", kind, path.as_uri(), backend=backend)


def test_a_speecht5_checkpoint_without_its_vocoder_is_refused(client, tmp_path):
    path = _checkpoint(tmp_path / "t5", {"model_type": "speecht5"})
    _refused(client, r"needs its HiFi-GAN vocoder .* in vocoder/", "foo", "audio", path.as_uri())
    _checkpoint(path / "vocoder", {"model_type": "hifigan"}, weights="pytorch_model.bin")
    _refused(client, r"weights are not in safetensors \(vocoder/pytorch_model\.bin\)", "foo", "audio", path.as_uri())


def test_a_diffusers_index_that_names_no_pipeline_is_refused(client, tmp_path):
    path = _checkpoint(tmp_path / "m", None, weights="")
    (path / "model_index.json").write_text('{"_class_name": "UNet2DModel"}')
    _refused(client, "not a diffusers pipeline", "foo", "image", path.as_uri())


def test_weights_that_are_not_safetensors_are_refused(client, tmp_path):
    gpt2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}
    path = _checkpoint(tmp_path / "m", gpt2, weights="pytorch_model.bin")
    msg = _refused(client, r"weights are not in safetensors \(pytorch_model\.bin\)", "foo", "text", path.as_uri())
    assert "pickled" in msg
    _refused(client, r"no weights \(\*\.safetensors\)", "foo", "text", _checkpoint(tmp_path / "n", gpt2, "").as_uri())
    unet = tmp_path / "pipe" / "unet"
    _checkpoint(unet, {}, weights="diffusion_pytorch_model.bin")
    (tmp_path / "pipe" / "model_index.json").write_text('{"_class_name": "DDPMPipeline"}')
    _refused(client, r"diffusion_pytorch_model\.bin", "foo", "image", (tmp_path / "pipe").as_uri())


def test_registry_defaults_outside_the_backends_parameters_are_refused(client, tiny_text_model):
    _refused(client, r"defaults\.voice: Extra inputs", "foo", "text", tiny_text_model.as_uri(),
             defaults={"voice": "en"})
    _refused(client, r"defaults\.temperature", "foo", "text", tiny_text_model.as_uri(), defaults={"temperature": 99})


def test_a_plugin_backend_is_checked_for_its_place_only(client, tmp_path):
    empty = tmp_path / "null-model"
    empty.mkdir()
    assert client.register_model("null", "text", empty.as_uri(), backend="null").version == 1


# ---- context length ---------------------------------------------------------------------------------

def test_the_context_length_and_model_type_are_recorded_at_registration(client, tiny_text_model):
    ref = client.register_model("house", "text", tiny_text_model.as_uri())
    assert ref.defaults == {"model_type": "gpt2", "context_length": 256}
    assert client.model("house").defaults["context_length"] == 256


def test_max_new_tokens_beyond_the_context_is_refused_at_submit(client):
    with pytest.raises(SpecError, match=r"items\[0\]: 1 prompt tokens plus max_new_tokens 300 is over the context "
                                        r"of 256 tokens of model tiny@1"):
        client.submit("text", model="tiny", items=["x"], params={"max_new_tokens": 300})
    assert client.jobs() == []


def test_prompt_tokens_plus_max_new_tokens_beyond_the_context_are_refused_at_submit(client):
    from tokenizers import Tokenizer

    ref = client.model("tiny")
    tok = Tokenizer.from_file(ref.uri.removeprefix("file://") + "/tokenizer.json")
    long = "word " * 100
    n = len(tok.encode(long).ids)
    assert n + 8 <= 256 < n + 100  # fits with the registry's 8 new tokens, not with 100
    client.submit("text", model="tiny", items=["short", long])
    with pytest.raises(SpecError, match=rf"items\[1\]: {n} prompt tokens plus max_new_tokens 100 is over the "
                                        "context of 256"):
        client.submit("text", model="tiny", items=["short", long], params={"max_new_tokens": 100})
    with pytest.raises(SpecError, match=r"items\[0\]: \d+ prompt tokens plus max_new_tokens 8"):
        client.submit("text", model="tiny", items=[{"messages": [{"role": "user", "content": "word " * 400}]}])


def test_without_a_local_tokenizer_max_new_tokens_alone_is_checked(client, tiny_text_model, tmp_path):
    copy = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_text_model, copy)
    client.register_model("tok-less", "text", copy.as_uri(), defaults={"max_new_tokens": 8})
    (copy / "tokenizer.json").unlink()
    client.submit("text", model="tok-less", items=["word " * 400])  # not counted: the worker refuses it
    with pytest.raises(SpecError, match="max_new_tokens 257 is over the context of 256"):
        client.submit("text", model="tok-less", items=["x"], params={"max_new_tokens": 257})


# ---- the command line ----------------------------------------------------------------------------

def test_the_cli_refuses_a_bad_registration_in_one_line_and_submit_takes_the_kind_from_the_registry(tmp_path):
    cli = Cli(tmp_path)
    r = cli("models", "register", "foo", "http://x/y")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "not http://" in r.stderr and len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1
    assert "foo" not in cli("models", "list").stdout
    r = cli("models", "register", "foo", (tmp_path / "nowhere").as_uri(), "--digest", "sha256:x")
    assert r.returncode != 0 and "--digest" in r.stderr
    # No --kind: espeak-en makes audio, so the job is an audio job (it used to be "makes audio, not text").
    items = _write(tmp_path / "i.jsonl", ['{"prompt": "Hello."}'])
    r = cli("submit", "--items", items, "--model", "espeak-en")
    assert r.returncode == 0, r.stderr[-2000:]
    shown = cli("status", r.stdout.split()[0], "--json")
    assert json.loads(shown.stdout)["kind"] == "audio"
