"""The project's own generators: a conditional VAE and GAN trained for seconds on load_digits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from aigc_models import digits

STEPS = 200  # about 1 s (VAE) and 3 s (GAN) on one core; fixed steps make the run reproducible


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Both kinds trained and saved once: {kind: (out_dir, metrics, steps seen by on_step)}."""
    result = {}
    for kind in digits.KINDS:
        seen: list[int] = []
        out = tmp_path_factory.mktemp("digits") / kind
        metrics = digits.train_digits(kind, out, seed=0, max_steps=STEPS,
                                      on_step=lambda s, _, seen=seen: seen.append(s))
        result[kind] = (out, metrics, seen)
    return result


def test_the_classifier_reads_real_digits_and_rejects_noise():
    images, labels = digits.digits_data()
    assert (digits.classify(images) == labels).mean() > 0.98
    noise = np.random.default_rng(0).random((200, 8, 8), dtype=np.float32)
    assert (digits.classify(noise) == np.arange(200) % 10).mean() < 0.3


def test_an_untrained_generator_is_not_recognised():
    torch.manual_seed(0)
    for kind in digits.KINDS:
        assert digits.recognition_accuracy(digits.build(kind), per_digit=20)["digit_accuracy"] < 0.4


def test_vae_training_lowers_its_negative_elbo(trained):
    _, m, _ = trained["vae"]
    assert m["objective"] == "neg_elbo"
    assert m["loss_after"] < 0.7 * m["loss_before"]


def test_gan_training_closes_the_gap_to_real_digit_means(trained):
    _, m, _ = trained["gan"]
    assert m["objective"] == "class_mean_gap"
    assert m["loss_after"] < 0.6 * m["loss_before"]
    assert {"d_loss_last", "g_loss_last"} <= m.keys()


@pytest.mark.parametrize(("kind", "floor"), [("vae", 0.95), ("gan", 0.75)])
def test_a_few_seconds_of_training_draws_the_digit_asked(trained, kind, floor):
    _, m, _ = trained[kind]
    assert m["digit_accuracy"] >= floor
    assert len(m["digit_accuracy_per_digit"]) == 10


def test_on_step_hears_every_step(trained):
    for kind in digits.KINDS:
        _, m, seen = trained[kind]
        assert seen == list(range(1, STEPS + 1)) and m["steps"] == STEPS


def test_the_directory_holds_a_config_and_safetensors_weights(trained):
    out, m, _ = trained["gan"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert (config["format"], config["kind"], config["image_size"], config["num_classes"]) == (
        "aigc-digits", "gan", 8, 10)
    assert config["latent_dim"] == digits.DEFAULTS["gan"]["latent_dim"]
    assert config["training"]["digit_accuracy"] == m["digit_accuracy"]


@pytest.mark.parametrize("kind", digits.KINDS)
def test_a_reloaded_model_draws_what_it_drew_before_saving(trained, kind):
    out, m, _ = trained[kind]
    model, config = digits.load(out)
    assert config["kind"] == kind
    assert digits.recognition_accuracy(model, per_digit=50, seed=1) == {
        k: m[k] for k in ("digit_accuracy", "digit_accuracy_per_digit")}


def test_the_gan_keeps_its_discriminator_so_training_can_resume(trained):
    from safetensors.torch import load_file

    keys = load_file(str(trained["gan"][0] / "model.safetensors")).keys()
    assert any(k.startswith("discriminator.") for k in keys) and any(k.startswith("generator.") for k in keys)


def test_on_step_returning_true_stops_training():
    m = digits.train_digits("vae", None, seconds=60, on_step=lambda step, _: step >= 5)
    assert m["steps"] == 5


def test_a_time_budget_ends_training():
    m = digits.train_digits("vae", None, seconds=0.3)
    assert m["steps"] > 0 and m["seconds"] < 5


def test_the_same_seed_and_steps_train_the_same_weights():
    a = digits.train_digits("vae", None, seed=3, max_steps=15)
    b = digits.train_digits("vae", None, seed=3, max_steps=15)
    c = digits.train_digits("vae", None, seed=4, max_steps=15)
    assert a["loss_after"] == b["loss_after"] != c["loss_after"]


def test_training_leaves_the_thread_count_as_it_was():
    before = torch.get_num_threads()
    digits.train_digits("vae", None, max_steps=1)
    assert torch.get_num_threads() == before


def test_a_directory_of_another_format_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="not an aigc-digits model"):
        digits.load(tmp_path)
    with pytest.raises(ValueError, match="kind"):
        digits.build("diffusion")


def test_the_demo_model_is_saved_once_and_reloads(tmp_path, monkeypatch):
    monkeypatch.setitem(digits.DEMO_STEPS, "vae", 20)
    digits._demo_state.cache_clear()
    try:
        out = digits.ensure_demo_digits(tmp_path / "demo", "demo-digits")
        stamp = (out / "model.safetensors").stat().st_mtime_ns
        assert digits.ensure_demo_digits(out, "demo-digits") == out
        assert (out / "model.safetensors").stat().st_mtime_ns == stamp
        _model, config = digits.load(out)
        assert (config["kind"], config["training"]["steps"]) == ("vae", 20)
    finally:
        digits._demo_state.cache_clear()
    with pytest.raises(ValueError, match="unknown built-in"):
        digits.demo_model("demo-letters")
