"""Registering s3:// models against a real S3 server: a missing prefix or pickled weights are refused;
a model registered without --digest gets the digest of its objects (the one its download is checked
against); a given digest is recorded and checked when a worker fetches the model."""

from __future__ import annotations

import pytest

from aigc_core.errors import ModelLoadError, SpecError
from aigc_core.registry import dir_digest, materialize

pytestmark = pytest.mark.integration


def _upload(s3_server, bucket: str, local, prefix: str) -> str:
    c = s3_server.client()
    for p in sorted(local.rglob("*")):
        if p.is_file():
            c.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(local).as_posix()}")
    return f"s3://{bucket}/{prefix}/"


@pytest.fixture
def s3_client(sqlite_settings, s3_server, s3_bucket):
    from scheduler import Client

    return Client(sqlite_settings.model_copy(update={"s3_endpoint_url": s3_server.endpoint}))


def test_a_missing_s3_prefix_is_refused_with_nothing_written(s3_client, s3_bucket):
    before = s3_client.models()
    with pytest.raises(SpecError, match=rf"nothing under s3://{s3_bucket}/models/none/: no such prefix"):
        s3_client.register_model("foo", "text", f"s3://{s3_bucket}/models/none/")
    assert s3_client.models() == before


def test_pickled_weights_under_an_s3_prefix_are_refused(s3_client, s3_server, s3_bucket, tmp_path):
    local = tmp_path / "pickled"
    local.mkdir()
    (local / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    (local / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    uri = _upload(s3_server, s3_bucket, local, "models/pickled")
    with pytest.raises(SpecError, match=r"weights are not in safetensors \(pytorch_model\.bin\)"):
        s3_client.register_model("foo", "text", uri)


def test_an_s3_model_gets_the_digest_its_download_is_checked_against(s3_client, s3_server, s3_bucket,
                                                                    tiny_text_model, tmp_path):
    uri = _upload(s3_server, s3_bucket, tiny_text_model, "models/tiny/1")
    ref = s3_client.register_model("tiny-s3", "text", uri)
    assert ref.digest == dir_digest(tiny_text_model)
    assert ref.defaults == {"model_type": "gpt2", "context_length": 256}  # read from S3's config.json
    path = materialize(ref, tmp_path / "cache", endpoint_url=s3_client.settings.s3_endpoint_url)
    assert (path / ".verified").read_text() == ref.digest and (path / "model.safetensors").is_file()
    # Submit knows the context without the weights at hand: max_new_tokens alone is checked.
    with pytest.raises(SpecError, match="max_new_tokens 300 is over the context of 256"):
        s3_client.submit("text", model="tiny-s3", items=["x"], params={"max_new_tokens": 300})


def test_a_given_digest_is_recorded_and_checked_on_fetch(s3_client, s3_server, s3_bucket, tiny_text_model, tmp_path):
    uri = _upload(s3_server, s3_bucket, tiny_text_model, "models/tiny/2")
    wrong = "sha256:" + "0" * 64
    ref = s3_client.register_model("tiny-given", "text", uri, digest=wrong)
    assert ref.digest == wrong
    with pytest.raises(ModelLoadError, match="does not match the registry"):
        materialize(ref, tmp_path / "cache", endpoint_url=s3_client.settings.s3_endpoint_url)
