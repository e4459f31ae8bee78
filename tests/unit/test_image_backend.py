"""The image backends on tiny models built from configs: a DDIM pipeline, a Stable-Diffusion-style
pipeline (UNet2DConditionModel + AutoencoderKL + CLIP text encoder), and the project's digit VAE."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from aigc_models import GenRequest, load_backend
from aigc_models.base import BackendError
from aigc_models.image import DigitsGenerator


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    """Tiny models on a busy 2-core machine run fastest on one thread."""


@pytest.fixture(scope="module")
def ddim_dir(tmp_path_factory):
    from tests.support.models import build_tiny_ddim

    return build_tiny_ddim(tmp_path_factory.mktemp("models") / "tiny-ddim")


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    from tests.support.models import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="module")
def ddim(ddim_dir):
    return load_backend("diffusers", ddim_dir, device="cpu")


@pytest.fixture(scope="module")
def sd(sd_dir):
    return load_backend("diffusers", sd_dir, device="cpu")


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    from aigc_models.digits import train_digits

    out = tmp_path_factory.mktemp("models") / "digits-vae"
    train_digits("vae", out, seed=0, max_steps=200)
    return out


@pytest.fixture(scope="module")
def digits_gen(digits_dir):
    return load_backend("digits", digits_dir, device="cpu")


def _pixels(out) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(out.data)))


FAST = {"num_inference_steps": 3}
SD_FAST = {"num_inference_steps": 3, "guidance_scale": 3.0}


# ---- diffusers, unconditional ---------------------------------------------------------------------

def test_an_unconditional_pipeline_ignores_the_prompt_and_makes_its_native_size(ddim):
    a, b = ddim.generate([GenRequest(0, "a cat", FAST, seed=7), GenRequest(1, "a dog", FAST, seed=7)])
    assert a.data == b.data
    assert a.media_type == "image/png" and a.ext == "png"
    assert _pixels(a).shape == (16, 16, 3)
    assert (a.info["width"], a.info["height"], a.info["steps"]) == (16, 16, 3)
    assert ddim.describe()["conditional"] is False


def test_an_unconditional_item_renders_the_same_alone_as_in_a_batch(ddim):
    reqs = [GenRequest(i, "", FAST, seed=100 + i) for i in range(5)]
    batched = ddim.generate(reqs)
    assert [o.data for o in batched] == [ddim.generate([r])[0].data for r in reqs]
    assert {o.info["batch_size"] for o in batched} == {5}


def test_the_seed_decides_the_image(ddim):
    same = {ddim.generate([GenRequest(0, "", FAST, seed=3)])[0].data for _ in range(2)}
    others = {ddim.generate([GenRequest(0, "", FAST, seed=s)])[0].data for s in range(4, 8)}
    assert len(same) == 1
    assert len(others) == 4 and not same & others


def test_an_unconditional_pipeline_refuses_another_size(ddim):
    with pytest.raises(BackendError, match="16x16"):
        ddim.generate([GenRequest(0, "", {**FAST, "height": 32, "width": 32}, seed=0)])


def test_mixed_params_run_in_their_own_groups_and_keep_order(ddim):
    reqs = [GenRequest(0, "", {"num_inference_steps": 2}, 0), GenRequest(1, "", {"num_inference_steps": 4}, 1),
            GenRequest(2, "", {"num_inference_steps": 2}, 2)]
    outs = ddim.generate(reqs)
    assert [o.info["steps"] for o in outs] == [2, 4, 2]
    assert [o.info["batch_size"] for o in outs] == [2, 1, 2]
    assert outs[2].data == ddim.generate([reqs[2]])[0].data


# ---- diffusers, text-conditioned ------------------------------------------------------------------

def test_a_text_conditioned_pipeline_follows_the_prompt(sd):
    cat, cat2, dog = sd.generate([GenRequest(0, "a cat", SD_FAST, seed=1), GenRequest(1, "a cat", SD_FAST, seed=1),
                                  GenRequest(2, "a dog", SD_FAST, seed=1)])
    assert cat.data == cat2.data
    assert cat.data != dog.data
    assert sd.describe()["conditional"] is True
    assert cat.info["guidance_scale"] == 3.0


def test_a_text_conditioned_item_renders_the_same_alone_as_in_a_batch(sd):
    reqs = [GenRequest(i, p, SD_FAST, seed=20 + i) for i, p in enumerate(["a cat", "red sky", "dog"])]
    assert [o.data for o in sd.generate(reqs)] == [sd.generate([r])[0].data for r in reqs]


def test_height_and_width_are_honoured(sd):
    out = sd.generate([GenRequest(0, "a cat", {**SD_FAST, "height": 16, "width": 32}, seed=0)])[0]
    assert _pixels(out).shape == (16, 32, 3)
    assert (out.info["width"], out.info["height"]) == (32, 16)


def test_guidance_and_negative_prompt_change_the_image(sd):
    base = sd.generate([GenRequest(0, "a cat", SD_FAST, seed=5)])[0].data
    stronger = sd.generate([GenRequest(0, "a cat", {**SD_FAST, "guidance_scale": 9.0}, seed=5)])[0].data
    negative = sd.generate([GenRequest(0, "a cat", {**SD_FAST, "negative_prompt": "dog"}, seed=5)])[0].data
    assert len({base, stronger, negative}) == 3


def test_a_size_off_the_latent_grid_is_an_error(sd):
    with pytest.raises(BackendError, match="multiple of 8"):
        sd.generate([GenRequest(0, "a cat", {**SD_FAST, "height": 20}, seed=0)])


def test_a_directory_without_a_pipeline_is_a_load_error(tmp_path, digits_dir):
    with pytest.raises(BackendError, match="cannot load a diffusers pipeline"):
        load_backend("diffusers", tmp_path, device="cpu")
    with pytest.raises(BackendError, match="cannot load a diffusers pipeline"):
        load_backend("diffusers", digits_dir, device="cpu")
    with pytest.raises(BackendError, match="not a directory"):  # and never a hub lookup
        load_backend("diffusers", tmp_path / "org" / "missing", device="cpu")


# ---- the project's digits -------------------------------------------------------------------------

@pytest.mark.parametrize(("prompt", "params", "seed", "expected"), [
    ("anything", {"digit": 4}, 9, (4, "param")),
    ("draw a 7 please", {}, 9, (7, "prompt")),
    ("a handwritten Three", {}, 9, (3, "prompt")),
    ("12 apples", {}, 15, (5, "seed")),
    ("", {}, 21, (1, "seed")),
])
def test_the_digit_comes_from_the_param_a_lone_digit_in_the_prompt_or_the_seed(prompt, params, seed, expected):
    assert DigitsGenerator.choose_digit(GenRequest(0, prompt, params, seed)) == expected


def test_generated_digits_are_read_as_the_digit_asked(digits_gen):
    from aigc_models.digits import classify

    reqs = [GenRequest(i, "", {"digit": i % 10}, seed=500 + i) for i in range(60)]
    outs = digits_gen.generate(reqs)
    # Upsampled by an integer factor with nearest: the 8x8 image comes back exactly by taking every 8th pixel.
    small = np.stack([_pixels(o)[::8, ::8] for o in outs]).astype(np.float32) / 255
    hits = classify(small) == np.array([i % 10 for i in range(60)])
    assert hits.mean() >= 0.9
    assert [o.info["digit"] for o in outs] == [i % 10 for i in range(60)]


def test_a_digit_renders_the_same_alone_as_in_a_batch(digits_gen):
    reqs = [GenRequest(i, "", {}, seed=1000 + i) for i in range(20)]
    assert [o.data for o in digits_gen.generate(reqs)] == [digits_gen.generate([r])[0].data for r in reqs]
    # Rounding to 8 bits hides most float differences; the floats themselves must match too.
    labels, seeds = [i % 10 for i in range(100)], list(range(100))
    alone = np.concatenate([digits_gen._forward([d], [s], 1.0) for d, s in zip(labels, seeds, strict=False)])
    assert np.array_equal(digits_gen._forward(labels, seeds, 1.0), alone)


def test_digit_images_are_grayscale_pngs_of_the_size_asked(digits_gen):
    out = digits_gen.generate([GenRequest(0, "", {"digit": 0, "size": 32}, seed=1)])[0]
    img = Image.open(io.BytesIO(out.data))
    assert (img.format, img.mode, img.size) == ("PNG", "L", (32, 32))
    assert (out.info["width"], out.info["kind"], out.info["digit_source"]) == (32, "vae", "param")
    inverted = digits_gen.generate([GenRequest(0, "", {"digit": 0, "size": 32, "invert": True}, seed=1)])[0]
    assert np.array_equal(_pixels(inverted), 255 - np.asarray(img))


def test_the_seed_varies_a_digit(digits_gen):
    outs = digits_gen.generate([GenRequest(i, "", {"digit": 8}, seed=s) for i, s in enumerate(range(6))])
    assert len({o.data for o in outs}) > 1


@pytest.mark.parametrize(("params", "message"), [
    ({"digit": 12}, "digit must be between 0 and 9"), ({"size": 4}, "size"), ({"resample": "lanczos"}, "resample"),
    ({"temperature": -1}, "temperature"),
])
def test_bad_digit_params_are_errors(digits_gen, params, message):
    with pytest.raises(BackendError, match=message):
        digits_gen.generate([GenRequest(0, "", params, seed=0)])


def test_the_builtin_demo_model_draws_recognisable_digits(monkeypatch):
    from aigc_models import digits

    monkeypatch.setitem(digits.DEMO_STEPS, "vae", 150)  # the real demo trains longer; the path is the same
    digits._demo_state.cache_clear()
    try:
        gen = load_backend("digits", "builtin://demo-digits", device="cpu")
        outs = gen.generate([GenRequest(i, f"the digit {i}", {"size": 8}, seed=i) for i in range(10)])
    finally:
        digits._demo_state.cache_clear()
    small = np.stack([_pixels(o) for o in outs]).astype(np.float32) / 255
    assert (digits.classify(small) == np.arange(10)).mean() >= 0.8
    assert gen.describe()["kind"] == "vae"


def test_a_directory_of_another_kind_is_a_digits_load_error(ddim_dir):
    with pytest.raises(BackendError, match="cannot load a digits model"):
        load_backend("digits", ddim_dir, device="cpu")
