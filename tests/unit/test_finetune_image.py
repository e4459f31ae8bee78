"""Image fine-tuning: datasets refused at submit by line, a text-to-image LoRA and an unconditional UNet
trained through the job type, registered with lineage and generating; a stopped run resumes exactly."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from aigc_core.errors import SpecError
from aigc_core.schema import Job, JobStatus
from tests.support.images import write_image_folder

LORA = {"max_steps": 24, "learning_rate": 1e-2, "batch_size": 4, "eval_every": 8, "checkpoint_every": 8,
        "rank": 4, "validation_prompts": ["red square"], "validation_steps": 5}


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    """Tiny models on a busy 2-core machine run fastest on one thread."""


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    from tests.support.models import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="module")
def ddim_dir(tmp_path_factory):
    from tests.support.models import build_tiny_ddim

    return build_tiny_ddim(tmp_path_factory.mktemp("models") / "tiny-ddim")


@pytest.fixture
def sd_client(client, sd_dir, ddim_dir):
    client.register_model("tiny-sd", "image", sd_dir.as_uri(), defaults={"num_inference_steps": 5})
    client.register_model("tiny-ddim", "image", ddim_dir.as_uri(), defaults={"num_inference_steps": 5})
    return client


def _pixels(client, job_id) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(client.store.get(r.key)))).astype(int) for r in client.results(job_id)]


def test_a_text_to_image_lora_registers_a_merged_version_that_draws_differently_with_the_same_seed(
        sd_client, tmp_path):
    c = sd_client
    data = write_image_folder(tmp_path / "house-style", 8)
    ft = c.finetune("tiny-sd", data, "house-style", LORA)
    items = ["red square", "blue square"]
    after = c.submit("image", model="house-style", items=items, seed=5, after=ft.id)
    before = c.submit("image", model="tiny-sd@1", items=items, seed=5)
    assert c.wait(after.id, timeout=300).status == JobStatus.succeeded, c.events(ft.id)[-3:]
    assert c.wait(before.id, timeout=120).status == JobStatus.succeeded

    (model,) = [m for m in c.models() if m["name"] == "house-style"]
    lin = model["lineage"]
    assert model["kind"] == "image" and model["backend"] == "diffusers" and lin["trainer"] == "text-to-image"
    assert lin["base_model"] == "tiny-sd@1" and lin["base_digest"] == c.model("tiny-sd").digest
    assert lin["dataset_sha256"].startswith("sha256:") and lin["hyperparameters"]["rank"] == 4
    assert lin["metrics"]["eval_loss"] < lin["metrics"]["eval_loss_before"]
    assert model["digest"] == lin["weights_digest"]
    train = [e for e in c.events(ft.id) if e["type"] == "train"]
    assert [e["step"] for e in train] == [8, 16, 24] and train[-1]["eval_loss"] < train[0]["eval_loss"]
    assert [e["name"] for e in c.events(ft.id) if e["type"] == "checkpoint"] == ["step-00000008", "step-00000016"]

    new, old = _pixels(c, after.id), _pixels(c, before.id)
    assert all(a.shape == b.shape == (16, 16, 3) for a, b in zip(new, old, strict=True))
    assert all(np.abs(a - b).mean() > 0.5 for a, b in zip(new, old, strict=True))
    assert all(r.provenance["model"]["weights_digest"] == model["digest"] for r in c.results(after.id))
    (card,) = list(c.results(ft.id))
    card = json.loads(c.store.get(card.key))
    assert card["model"] == "house-style@1" and [u.rsplit("/", 1)[1] for u in card["validation"]] == [
        "before-00.png", "after-00.png"]


def test_an_unconditional_unet_fine_tunes_on_a_folder_without_metadata(sd_client, tmp_path):
    c = sd_client
    data = write_image_folder(tmp_path / "textures", 6, size=16, metadata=False)
    hp = {"max_steps": 12, "learning_rate": 2e-3, "batch_size": 3, "eval_every": 6, "checkpoint_every": 0,
          "validation_images": 1, "validation_steps": 5}
    ft = c.finetune("tiny-ddim", data, "house-textures", hp)
    gen = c.submit("image", model="house-textures", items=[""], seed=1, after=ft.id)
    assert c.wait(gen.id, timeout=300).status == JobStatus.succeeded, c.events(ft.id)[-3:]
    (model,) = [m for m in c.models() if m["name"] == "house-textures"]
    lin = model["lineage"]
    assert lin["trainer"] == "unconditional-image" and lin["hyperparameters"]["lora"] is False
    assert lin["metrics"]["eval_loss"] < lin["metrics"]["eval_loss_before"] and lin["metrics"]["steps"] == 12
    assert _pixels(c, gen.id)[0].shape == (16, 16, 3)


@pytest.mark.parametrize("lines, files, message", [
    (['{"file_name": "000.png", "text": "a"}', '{"file_name": "9.png", "text": "b"}'], {},
     "line 2: 9.png: no such file"),
    (['{"file_name": "000.png", "text": "a"}', "{oops"], {}, "line 2: not valid JSON"),
    (['{"file_name": "000.png"}'], {}, 'line 1: "text" must be a non-empty string'),
    (['{"file_name": "../000.png", "text": "a"}'], {}, "line 1: file_name '../000.png' must be a relative path"),
    (['{"file_name": "000.png", "text": "a"}', '{"file_name": "bad.png", "text": "b"}'],
     {"bad.png": b"\x89PNG\r\n\x1a\n not really"}, "line 2: bad.png: not a readable image"),
    (['{"file_name": "tiny.png", "text": "a"}'], {"tiny.png": "4x4"}, "line 1: tiny.png: 4x4; each side"),
])
def test_bad_image_datasets_are_refused_at_submit_naming_the_line(sd_client, tmp_path, lines, files, message):
    data = write_image_folder(tmp_path / "bad", 1, metadata=False)
    for name, content in files.items():
        if content == "4x4":
            Image.new("RGB", (4, 4)).save(data / name)
        else:
            (data / name).write_bytes(content)
    (data / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(SpecError, match=message.replace("(", r"\(")):
        sd_client.finetune("tiny-sd", data, "house", LORA)
    with sd_client.db.session() as s:
        assert s.scalars(select(Job)).all() == []


@pytest.mark.parametrize("limit, value, message", [
    ("MAX_IMAGE_PIXELS", 32 * 32 - 1, r"line 2: 001\.png: 32x32 pixels; at most 1023"),
    ("MAX_IMAGE_BYTES", 100, r"line 2: 001\.png: \d+ bytes; an image may have at most 100 bytes"),
    ("MAX_IMAGES", 2, "holds 3 files; at most 2"),
])
def test_image_datasets_over_a_size_limit_are_refused(sd_client, tmp_path, monkeypatch, limit, value, message):
    from aigc_models import image_data

    data = write_image_folder(tmp_path / "big", 3)
    Image.new("RGB", (16, 16)).save(data / "000.png")  # under the pixel limit: the second image trips it
    monkeypatch.setattr(image_data, limit, value)
    with pytest.raises(SpecError, match=message):
        sd_client.finetune("tiny-sd", data, "house", LORA)


def test_bad_image_finetune_requests_are_refused(sd_client, tmp_path):
    c = sd_client
    data = write_image_folder(tmp_path / "ok", 2)
    with pytest.raises(SpecError, match="no such folder"):
        c.finetune("tiny-sd", tmp_path / "missing", "house", LORA)
    with pytest.raises(SpecError, match="needs one"):
        c.finetune("tiny-sd", write_image_folder(tmp_path / "nometa", 2, metadata=False), "house", LORA)
    with pytest.raises(SpecError, match="rank must be an integer"):
        c.finetune("tiny-sd", data, "house", {"rank": 0})
    with pytest.raises(SpecError, match="unknown image fine-tuning option"):
        c.finetune("tiny-sd", data, "house", {"epochs": 2})
    with pytest.raises(SpecError, match="fine-tuned whole"):
        c.finetune("tiny-ddim", data, "house", {"lora": True})
    with pytest.raises(SpecError, match="takes no prompt"):
        c.finetune("tiny-ddim", data, "house", {"validation_prompts": ["x"]})


def test_a_stopped_run_resumes_from_its_checkpoint_to_the_same_weights(sd_dir, tmp_path):
    from safetensors.torch import load_file

    from aigc_models.image_data import ImageFinetuneConfig, read_records
    from aigc_models.image_finetune import finetune_diffusion

    data = write_image_folder(tmp_path / "data", 8)
    records = read_records(data, captions=True)
    cfg = ImageFinetuneConfig(max_steps=12, learning_rate=1e-2, batch_size=4, eval_every=4, checkpoint_every=4,
                              random_flip=True, center_crop=False)
    whole = finetune_diffusion(sd_dir, data, records, tmp_path / "whole", cfg, checkpoint_dir=tmp_path / "c1",
                               device="cpu")
    asked = iter(range(100))
    cut = finetune_diffusion(sd_dir, data, records, tmp_path / "cut", cfg, checkpoint_dir=tmp_path / "c2",
                             should_stop=lambda: next(asked) == 6, device="cpu")
    assert cut["interrupted"] and cut["steps"] == 6 and not (tmp_path / "cut" / "model_index.json").exists()
    resumed = finetune_diffusion(sd_dir, data, records, tmp_path / "cut", cfg, checkpoint_dir=tmp_path / "c2",
                                 resume_from=tmp_path / "c2" / "step-00000006", device="cpu")
    assert resumed["steps"] == whole["steps"] == 12
    assert resumed["eval_loss"] == pytest.approx(whole["eval_loss"], rel=1e-5)
    a = load_file(tmp_path / "whole" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "cut" / "unet" / "diffusion_pytorch_model.safetensors")
    base = load_file(sd_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert set(a) == set(base)  # merged: the plain UNet's parameters, no LoRA layers left
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    changed = {k for k in a if (a[k] - base[k]).abs().max().item() > 0}
    assert changed and all(".attn" in k and k.rsplit(".", 2)[-2] in ("to_q", "to_k", "to_v", "0") for k in changed)
    with pytest.raises(ValueError, match="cannot resume: the checkpoint was trained with rank=4"):
        finetune_diffusion(sd_dir, data, records, tmp_path / "x", ImageFinetuneConfig(rank=8),
                           resume_from=tmp_path / "c2" / "step-00000006", device="cpu")


def test_the_cli_submits_an_image_fine_tune_with_the_readmes_options(sd_dir, tmp_path):
    from tests.unit.test_cli import Cli, _job_params

    cli = Cli(tmp_path)
    assert cli("models", "register", "tiny-sd", sd_dir.as_uri(), "--kind", "image").returncode == 0
    data = write_image_folder(tmp_path / "style", 4)
    r = cli("finetune", "--base", "tiny-sd", "--dataset", data, "--output", "house-style", "-p", "rank=8",
            "-p", "max_steps=1000", "-p", "validation_prompts=a red square, house style")
    assert r.returncode == 0, r.stderr
    p = _job_params(cli, r.stdout.strip())
    assert p["trainer"] == "text-to-image" and p["dataset_stats"] == {"images": 4, "bytes": p["dataset_stats"]["bytes"],
                                                                    "captioned": 4}
    assert p["hyperparameters"]["rank"] == 8 and p["hyperparameters"]["max_steps"] == 1000
    assert p["hyperparameters"]["validation_prompts"] == ["a red square, house style"]


def test_lora_false_trains_the_whole_unet_and_keeps_no_adapter(sd_dir, tmp_path):
    from safetensors.torch import load_file

    from aigc_models.image_data import ImageFinetuneConfig, read_records
    from aigc_models.image_finetune import finetune_diffusion

    data = write_image_folder(tmp_path / "data", 4)
    cfg = ImageFinetuneConfig(max_steps=4, learning_rate=1e-3, batch_size=2, eval_every=2, lora=False,
                              resolution=32)
    m = finetune_diffusion(sd_dir, data, read_records(data, captions=True), tmp_path / "out", cfg, device="cpu")
    assert m["steps"] == 4 and "rank" in m and m["rank"] is None
    assert not (tmp_path / "out" / "lora").exists()
    new = load_file(tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors")
    base = load_file(sd_dir / "unet" / "diffusion_pytorch_model.safetensors")
    changed = {k for k in base if (new[k] - base[k]).abs().max().item() > 0}
    assert "conv_in.weight" in changed and len(changed) > len(base) // 2  # not only attention: the whole UNet
