"""C2PA content credentials: signed in the worker before storing, verified with a test CA as trust anchor."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from aigc_core.credentials import (
    PROVENANCE_LABEL,
    TRAINED_ALGORITHMIC_MEDIA,
    init_test_ca,
    load_material,
    signing_mode,
    verify,
)
from aigc_core.schema import ItemStatus, JobStatus
from aigc_core.settings import Settings
from worker.credentials import SigningFailed, sign_bytes, sign_output

PROV = {"job_id": "job-1", "item_index": 7, "custom_id": "c7", "seed": 42, "params": {"steps": 3},
        "model": {"name": "demo-digits", "version": "1", "weights_digest": "sha256:abc", "backend": "digits"}}


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return init_test_ca(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def material(ca):
    return load_material(Settings(c2pa_cert_file=str(ca["chain"]), c2pa_key_file=str(ca["key"])))


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)).save(buf, "PNG")
    return buf.getvalue()


def _wav() -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.sin(np.linspace(0, 440, 22050)).astype(np.float32) * 0.3, 22050, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _assertion(manifest: dict, label: str) -> dict:
    return next(a["data"] for a in manifest["assertions"] if a["label"] == label)


@pytest.mark.parametrize(("media_type", "make"), [("image/png", _png), ("audio/wav", _wav)])
def test_a_signed_output_is_trusted_under_the_test_ca_and_carries_the_model_and_provenance(
        ca, material, media_type, make):
    signed = sign_bytes(material, make(), media_type, PROV)
    report = verify(signed.data, anchors=ca["ca"].read_text())
    assert report["state"] == "Trusted", report
    m = report["manifest"]
    assert m["claim_generator_info"][0]["name"] == "aigc-runner"
    action = _assertion(m, "c2pa.actions.v2")["actions"][0]
    assert action["action"] == "c2pa.created" and action["digitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA
    assert action["softwareAgent"]["name"] == "demo-digits@1"
    ours = _assertion(m, PROVENANCE_LABEL)
    assert (ours["job_id"], ours["item_index"], ours["seed"], ours["params"]) == ("job-1", 7, 42, {"steps": 3})
    assert ours["model"]["weights_digest"] == "sha256:abc"
    # Without the CA as anchor the signature is still good, the signer just is not trusted.
    assert verify(signed.data)["state"] == "Valid"


@pytest.mark.parametrize(("media_type", "make"), [("image/png", _png), ("audio/wav", _wav)])
def test_a_tampered_file_fails_verification(ca, material, media_type, make):
    data = bytearray(sign_bytes(material, make(), media_type, PROV).data)
    data[data.index(b"IDAT" if media_type == "image/png" else b"data") + 20] ^= 0x01  # one bit of the pixels/samples
    report = verify(bytes(data), anchors=ca["ca"].read_text())
    assert report["state"] == "Invalid" and report["failures"]


def test_an_unsigned_file_reads_as_unsigned():
    assert verify(_png())["state"] == "Unsigned"


def test_text_gets_a_detached_manifest_that_binds_the_article(ca, material):
    article = "Rain in Riverton. Über.\n".encode()
    signed = sign_bytes(material, article, "text/plain", PROV)
    assert signed.data == article and signed.detached
    anchors = ca["ca"].read_text()
    assert verify(article, anchors=anchors, detached=signed.detached)["state"] == "Trusted"
    edited = verify(b"Sun in Riverton.\n", anchors=anchors, detached=signed.detached)
    assert edited["state"] == "Invalid" and "org.aigc-runner.text.hash.mismatch" in edited["failures"]


def test_auto_mode_signs_only_when_a_certificate_and_key_are_configured(ca):
    assert signing_mode(Settings()) == "off"
    assert signing_mode(Settings(c2pa_cert_file=str(ca["chain"]), c2pa_key_file=str(ca["key"]))) == "optional"
    assert signing_mode(Settings(c2pa_signing="required")) == "required"


def test_optional_signing_without_a_key_stores_unsigned_and_never_logs_the_key(ca, caplog):
    key_pem = ca["key"].read_text()
    broken = Settings(c2pa_signing="optional", c2pa_cert_file=str(ca["chain"]), c2pa_key_pem="not a key")
    with caplog.at_level(logging.WARNING, logger="aigc.worker"):
        assert sign_output(broken, b"x", "image/png", {}).data == b"x"
    assert "C2PA signing failed" in caplog.text and "not a key" not in caplog.text
    required = Settings(c2pa_signing="required", c2pa_cert_file=str(ca["chain"]), c2pa_key_pem=key_pem)
    assert key_pem not in repr(required) and key_pem.splitlines()[1] not in repr(load_material(required))
    with pytest.raises(SigningFailed, match="private key"):
        sign_output(Settings(c2pa_signing="required", c2pa_cert_file=str(ca["chain"])), _png(), "image/png", {})
    with pytest.raises(SigningFailed, match="audio/mpeg outputs cannot be signed"):
        sign_output(required, b"ID3", "audio/mpeg", {})
    optional = required.model_copy(update={"c2pa_signing": "optional"})
    assert sign_output(optional, b"ID3", "audio/mpeg", {}).data == b"ID3"


# ---- through the pipeline ------------------------------------------------------------------------

@pytest.fixture
def signing_settings(sqlite_settings, ca):
    return sqlite_settings.model_copy(update={
        "torch_threads": 1, "c2pa_signing": "required", "c2pa_cert_file": str(ca["chain"]),
        "c2pa_key_file": str(ca["key"]), "c2pa_trust_anchors_file": str(ca["ca"])})


def test_embedded_image_and_audio_jobs_store_signed_outputs_that_verify(signing_settings, tmp_path):
    from scheduler import Client

    client = Client(signing_settings)
    img = client.submit("image", model="demo-digits", items=[{"params": {"digit": d}} for d in (3, 8)],
                        params={"size": 32}, seed=5)
    wav = client.submit("audio", model="espeak-en", items=["Hello from Riverton."])
    for job in (img, wav):
        assert client.wait(job.id, timeout=120).status == JobStatus.succeeded
        for r in client.results(job.id):
            assert r.key is not None
            data = client.store.get(r.key)
            assert hashlib.sha256(data).hexdigest() == r.sha256 and len(data) == r.size  # the signed bytes
            report = client.verify(r.key)
            assert report["state"] == "Trusted", report
            ours = _assertion(report["manifest"], PROVENANCE_LABEL)
            assert (ours["job_id"], ours["custom_id"]) == (job.id, r.custom_id)
            assert r.provenance["c2pa"]["signed"] is True
    # A downloaded copy verifies as a local file too.
    path = client.download(img.id, tmp_path / "dl") / "items" / "000000.png"
    assert client.verify(path)["state"] == "Trusted"


def test_a_text_output_gets_a_detached_manifest_beside_it(signing_settings, tiny_text_model):
    from scheduler import Client

    client = Client(signing_settings)
    client.register_model("tiny", "text", tiny_text_model.as_uri(), defaults={"max_new_tokens": 8})
    job = client.submit("text", model="tiny", items=["Headline: Rain\n\n"])
    assert client.wait(job.id, timeout=120).status == JobStatus.succeeded
    (r,) = list(client.results(job.id))
    assert r.key is not None and client.store.exists(r.key + ".c2pa")
    assert client.verify(r.key)["state"] == "Trusted"


def test_download_fetches_a_text_outputs_detached_manifest_beside_it(signing_settings, tiny_text_model, tmp_path):
    from scheduler import Client

    client = Client(signing_settings)
    client.register_model("tiny", "text", tiny_text_model.as_uri(), defaults={"max_new_tokens": 8})
    job = client.submit("text", model="tiny", items=["Headline: Rain\n\n", "Headline: Sun\n\n"])
    assert client.wait(job.id, timeout=120).status == JobStatus.succeeded
    out = client.download(job.id, tmp_path / "dl") / "items"
    for r in client.results(job.id):
        article = out / f"{r.index:06d}.txt"
        assert (out / f"{r.index:06d}.txt.c2pa").read_bytes() == client.store.get(f"{r.key}.c2pa")
        assert client.verify(article)["state"] == "Trusted"  # the local file, checked with the manifest beside it
    # Without its manifest the downloaded article is unsigned: the file beside it is what binds it.
    (out / "000000.txt.c2pa").unlink()
    assert client.verify(out / "000000.txt")["state"] == "Unsigned"


def test_a_missing_key_under_required_fails_the_items_not_the_job_and_stores_nothing(signing_settings, ca,
                                                                                      tmp_path):
    from scheduler import Client

    settings = signing_settings.model_copy(update={"c2pa_key_file": str(tmp_path / "absent.key")})
    client = Client(settings)
    job = client.submit("image", model="demo-digits", items=[{"params": {"digit": d}} for d in range(3)],
                        params={"size": 16})
    view = client.wait(job.id, timeout=120)
    assert view.status == JobStatus.failed and view.counts["failed"] == 3
    with client.db.session() as s:
        from sqlalchemy import select

        from aigc_core.schema import Item

        errors = s.scalars(select(Item.error).where(Item.job_id == job.id, Item.status == ItemStatus.failed)).all()
    assert len(errors) == 3 and all("C2PA signing failed" in str(e) and "private key" in str(e) for e in errors)
    assert list(client.store.list(f"jobs/{job.id}/items/")) == []  # no output, no sidecar
    # The job is not broken: with the key in place its failed items are retried and signed.
    (tmp_path / "absent.key").write_bytes(ca["key"].read_bytes())
    assert client.retry_failed(job.id) == 3
    assert client.wait(job.id, timeout=120).status == JobStatus.succeeded
    assert all(client.verify(r.key or "")["state"] == "Trusted" for r in client.results(job.id))


def test_cli_makes_test_credentials_and_verifies_a_file(tmp_path, material, ca):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIGC_")}
    aigc = [sys.executable, "-m", "scheduler.cli"]
    made = subprocess.run([*aigc, "credentials", "init", str(tmp_path / "creds")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert made.returncode == 0 and "for testing only" in made.stderr
    settings = dict(line.split("=", 1) for line in made.stdout.splitlines())
    assert set(settings) == {"AIGC_C2PA_CERT_FILE", "AIGC_C2PA_KEY_FILE", "AIGC_C2PA_TRUST_ANCHORS_FILE"}
    made_ca = load_material(Settings(c2pa_cert_file=settings["AIGC_C2PA_CERT_FILE"],
                                     c2pa_key_file=settings["AIGC_C2PA_KEY_FILE"]))
    signed = sign_bytes(made_ca, _png(), "image/png", PROV)
    (tmp_path / "a.png").write_bytes(signed.data)
    shown = subprocess.run([*aigc, "verify", str(tmp_path / "a.png")], env={**env, **settings},
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "Trusted" in shown.stdout and "demo-digits@1" in shown.stdout, shown
    untrusted = subprocess.run([*aigc, "verify", str(tmp_path / "a.png")], env=env, capture_output=True, text=True,
                               timeout=60)
    assert untrusted.returncode == 0 and "Valid" in untrusted.stdout
    (tmp_path / "b.png").write_bytes(_png())
    unsigned = subprocess.run([*aigc, "verify", str(tmp_path / "b.png")], env=env, capture_output=True, text=True,
                              timeout=60)
    assert unsigned.returncode == 1 and "Unsigned" in unsigned.stdout


def test_verify_on_the_command_line_never_loads_torch(tmp_path, material):
    (tmp_path / "a.png").write_bytes(sign_bytes(material, _png(), "image/png", PROV).data)
    code = ("import sys\nfrom scheduler.cli.root import app\ntry:\n    app(['verify', sys.argv[1]])\n"
            "except SystemExit as e:\n    assert e.code == 0, e.code\nassert 'torch' not in sys.modules\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIGC_")}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.png")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
