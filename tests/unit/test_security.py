"""Security without servers: weights load only from safetensors, TLS settings for a rediss:// broker,
passwords masked, S3 credentials never taken from a URL, presigned URLs short-lived."""

from __future__ import annotations

import ast
import ssl
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from aigc_core.errors import SpecError
from aigc_core.settings import Settings, mask_url

ROOT = Path(__file__).resolve().parents[2]


# ---- weights: safetensors only ----------------------------------------------------------------------

def _to_pickle(safetensors_file: Path, bin_name: str) -> None:
    """Replace a safetensors weights file by the same weights as a pickled ``torch.save`` file."""
    import torch
    from safetensors.torch import load_file

    state = load_file(str(safetensors_file))
    safetensors_file.unlink()
    torch.save(state, safetensors_file.with_name(bin_name))


@pytest.fixture
def pickled_text_model(tiny_text_model, tmp_path) -> Path:
    import shutil

    d = Path(shutil.copytree(tiny_text_model, tmp_path / "pickled-gpt2"))
    _to_pickle(d / "model.safetensors", "pytorch_model.bin")
    return d


def test_a_text_model_with_only_pickled_weights_is_refused_by_the_loading_path(pickled_text_model):
    from transformers import AutoModelForCausalLM

    from aigc_models.base import BackendError, load_backend

    # The directory is a loadable checkpoint: transformers alone would unpickle pytorch_model.bin.
    assert AutoModelForCausalLM.from_pretrained(pickled_text_model) is not None
    with pytest.raises(BackendError, match=r"cannot load a causal LM .*no file named model\.safetensors"):
        load_backend("hf-causal-lm", pickled_text_model, "cpu")


def test_a_diffusers_pipeline_with_only_pickled_weights_is_refused(tmp_path):
    from aigc_models.base import BackendError, load_backend
    from tests.support.models import build_tiny_ddim

    d = build_tiny_ddim(tmp_path / "ddim")
    _to_pickle(d / "unet" / "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
    with pytest.raises(BackendError, match=r"no file named diffusion_pytorch_model\.safetensors"):
        load_backend("diffusers", d, "cpu")


# Classes whose from_pretrained reads configuration or vocabulary, never pickled weights.
NO_WEIGHTS = ("Tokenizer", "Config", "Processor", "FeatureExtractor", "GenerationConfig")


def _weight_loads(tree: ast.AST):
    """(line, problem) for every torch.load without weights_only=True and every from_pretrained of a
    model without use_safetensors=True."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        kw = {k.arg: k.value for k in node.keywords}
        receiver = ast.unparse(node.func.value)
        if node.func.attr == "load" and receiver == "torch":
            if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                yield node.lineno, "torch.load without weights_only=True"
        elif node.func.attr == "from_pretrained" and not receiver.endswith(NO_WEIGHTS) and not (
                isinstance(kw.get("use_safetensors"), ast.Constant) and kw["use_safetensors"].value is True):
            yield node.lineno, f"{receiver}.from_pretrained without use_safetensors=True"


def test_every_weights_load_in_the_product_is_safetensors_or_weights_only():
    problems = []
    sources = [p for pkg in ("aigc_models", "worker", "aigc_core", "scheduler") for p in (ROOT / pkg).rglob("*.py")]
    loads = 0
    for path in sources:
        tree = ast.parse(path.read_text(), str(path))
        src = path.read_text()
        loads += src.count("torch.load(") + src.count(".from_pretrained(")
        problems += [f"{path.relative_to(ROOT)}:{line}: {what}" for line, what in _weight_loads(tree)]
    assert loads >= 5, "the scan found no loading code: did the packages move?"
    assert not problems, "\n".join(problems)


def test_the_scan_catches_an_unsafe_load():
    bad = ast.parse("import torch\nx = torch.load(p)\nm = AutoModelForCausalLM.from_pretrained(p)\n"
                    "t = AutoTokenizer.from_pretrained(p)\ny = torch.load(p, weights_only=True)\n")
    assert [line for line, _ in _weight_loads(bad)] == [2, 3]


# ---- Redis TLS and password settings ----------------------------------------------------------------

def test_a_rediss_broker_verifies_certificates_by_default_and_takes_the_configured_files(monkeypatch):
    for k in ("AIGC_BROKER_SSL_CERT_REQS", "AIGC_BROKER_SSL_CA_CERTS", "AIGC_BROKER_SSL_CERTFILE",
              "AIGC_BROKER_SSL_KEYFILE"):
        monkeypatch.delenv(k, raising=False)
    assert Settings(broker_url="redis://:pw@h:6379/0").broker_ssl() is None
    assert Settings(broker_url=None).broker_ssl() is None
    assert Settings(broker_url="rediss://:pw@h:6380/0").broker_ssl() == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    monkeypatch.setenv("AIGC_BROKER_SSL_CA_CERTS", "/etc/aigc/ca.pem")
    monkeypatch.setenv("AIGC_BROKER_SSL_CERTFILE", "/etc/aigc/client.pem")
    monkeypatch.setenv("AIGC_BROKER_SSL_KEYFILE", "/etc/aigc/client.key")
    monkeypatch.setenv("AIGC_BROKER_SSL_CERT_REQS", "optional")
    assert Settings(broker_url="rediss://h:6380/0").broker_ssl() == {
        "ssl_cert_reqs": ssl.CERT_OPTIONAL, "ssl_ca_certs": "/etc/aigc/ca.pem",
        "ssl_certfile": "/etc/aigc/client.pem", "ssl_keyfile": "/etc/aigc/client.key"}
    monkeypatch.setenv("AIGC_BROKER_SSL_CERT_REQS", "sometimes")
    with pytest.raises(ValueError):
        Settings()


def test_every_celery_app_and_the_publisher_use_the_tls_options(monkeypatch, tmp_path):
    monkeypatch.setenv("AIGC_BROKER_SSL_CA_CERTS", "/etc/aigc/ca.pem")
    s = Settings(broker_url="rediss://:pw@h:6380/0")
    want = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "/etc/aigc/ca.pem"}
    from scheduler.client import Client
    from scheduler.cron.beat import make_app as beat_app
    from worker.app import make_app as worker_app

    assert worker_app(s).conf.broker_use_ssl == want
    assert beat_app(s).conf.broker_use_ssl == want
    c = Client(s.model_copy(update={"database_url": f"sqlite:///{tmp_path}/a.db", "storage_url": f"file://{tmp_path}"}))
    assert c.publish.app.conf.broker_use_ssl == want


@pytest.mark.parametrize("url, shown", [
    ("redis://:s3cr3t@redis:6379/0", "redis://:***@redis:6379/0"),
    ("rediss://default:s3cr3t@redis:6380/1?ssl_cert_reqs=required", "rediss://default:***@redis:6380/1?ssl_cert_reqs=required"),
    ("postgresql://aigc:s3cr3t@db:5432/aigc", "postgresql://aigc:***@db:5432/aigc"),
    ("postgresql://aigc@db/aigc", "postgresql://aigc@db/aigc"),
    ("https://s3cr3t@[broken", "https://***"),
])
def test_mask_url_hides_the_password_and_keeps_the_rest(url, shown):
    assert mask_url(url) == shown and "s3cr3t" not in mask_url(url)


def test_s3_credentials_are_never_taken_from_or_shown_with_a_storage_url():
    from aigc_core.storage import open_store

    with pytest.raises(SpecError, match=r"credentials never go in a URL") as e:
        open_store("s3://AKIAEXAMPLE:s3cr3t@bucket/prefix")
    assert "s3cr3t" not in str(e.value)
    with pytest.raises(SpecError) as e:
        open_store("https://AKIAEXAMPLE:s3cr3t@minio.local/bucket")
    assert "s3cr3t" not in str(e.value)


def test_a_presigned_url_defaults_to_15_minutes_and_refuses_long_lives(monkeypatch):
    from aigc_core.storage import S3Store

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    store = S3Store("bucket", "out", endpoint_url="http://127.0.0.1:1")  # signing needs no server
    q = parse_qs(urlsplit(store.presign_get("jobs/x/items/000000.txt")).query)
    assert q["X-Amz-Expires"] == ["900"] and "X-Amz-Signature" in q
    assert parse_qs(urlsplit(store.presign_get("a.txt", expires_s=60)).query)["X-Amz-Expires"] == ["60"]
    for bad in (0, 86_401):
        with pytest.raises(SpecError, match="presigned URL expiry"):
            store.presign_get("a.txt", expires_s=bad)
