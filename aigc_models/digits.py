"""The project's own image generators: a conditional VAE and a conditional GAN for 8x8 digits.

Both train in seconds on scikit-learn's ``load_digits`` (1,797 images, 8x8, values 0..16) in plain
torch, and save to one directory format: ``config.json`` (architecture, kind, sizes, training
metrics) + ``model.safetensors``. A small SVC on the same data says whether a sample is the digit asked.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

FORMAT = "aigc-digits"
KINDS = ("gan", "vae")
NUM_CLASSES = 10
IMAGE_SIZE = 8
DEFAULTS: dict[str, dict[str, Any]] = {
    "vae": {"latent_dim": 8, "hidden": 256, "batch_size": 64, "learning_rate": 2e-3},
    "gan": {"latent_dim": 32, "hidden": 32, "batch_size": 64, "learning_rate": 5e-4},
}


class CVAE(nn.Module):
    """Encoder q(z | x, y) and decoder p(x | z, y); pixels are Bernoulli means in [0, 1]."""

    def __init__(self, latent_dim: int = 8, hidden: int = 256):
        super().__init__()
        self.latent_dim = latent_dim
        d = IMAGE_SIZE * IMAGE_SIZE
        self.encoder = nn.Sequential(nn.Linear(d + NUM_CLASSES, hidden), nn.ReLU(),
                                     nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent_dim))
        self.decoder = nn.Sequential(nn.Linear(latent_dim + NUM_CLASSES, hidden), nn.ReLU(),
                                     nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, d))

    def decode_logits(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.cat([z, F.one_hot(labels, NUM_CLASSES).to(z.dtype)], 1))

    def decode(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decode_logits(z, labels)).view(-1, IMAGE_SIZE, IMAGE_SIZE)

    def loss(self, x01: torch.Tensor, labels: torch.Tensor, gen: torch.Generator | None) -> dict[str, torch.Tensor]:
        """Negative ELBO per image: reconstruction (binary cross-entropy, summed over pixels) + KL."""
        flat = x01.view(len(x01), -1)
        mu, logvar = self.encoder(torch.cat([flat, F.one_hot(labels, NUM_CLASSES).to(flat.dtype)], 1)).chunk(2, 1)
        z = mu + torch.randn(mu.shape, generator=gen, device=mu.device) * (0.5 * logvar).exp()
        recon = F.binary_cross_entropy_with_logits(self.decode_logits(z, labels), flat, reduction="sum") / len(x01)
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / len(x01)
        return {"loss": recon + kl, "recon": recon, "kl": kl}


class CGAN(nn.Module):
    """A DCGAN-style pair: G maps (z, y) to an 8x8 image in [-1, 1]; D scores (image, y) as real or fake."""

    def __init__(self, latent_dim: int = 32, hidden: int = 64):
        super().__init__()
        self.latent_dim = latent_dim
        h = hidden
        self.label_embed = nn.Embedding(NUM_CLASSES, latent_dim)
        self.generator = nn.Sequential(
            nn.Linear(2 * latent_dim, 2 * h * 2 * 2), nn.LeakyReLU(0.2), nn.Unflatten(1, (2 * h, 2, 2)),
            nn.ConvTranspose2d(2 * h, h, 4, 2, 1), nn.LeakyReLU(0.2),  # 4x4
            nn.ConvTranspose2d(h, h // 2, 4, 2, 1), nn.LeakyReLU(0.2),  # 8x8
            nn.Conv2d(h // 2, 1, 3, 1, 1), nn.Tanh(),
        )
        self.discriminator = nn.Sequential(
            nn.Conv2d(1, h, 4, 2, 1), nn.LeakyReLU(0.2),  # 4x4
            nn.Conv2d(h, 2 * h, 4, 2, 1), nn.LeakyReLU(0.2),  # 2x2
            nn.Flatten(),
        )
        self.real_fake = nn.Linear(2 * h * 2 * 2, 1)
        self.class_projection = nn.Embedding(NUM_CLASSES, 2 * h * 2 * 2)  # a projection discriminator

    def generate(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.generator(torch.cat([z, self.label_embed(labels)], 1))

    def decode(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return ((self.generate(z, labels) + 1) / 2).view(-1, IMAGE_SIZE, IMAGE_SIZE)

    def score(self, x11: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        features = self.discriminator(x11.view(-1, 1, IMAGE_SIZE, IMAGE_SIZE))
        return self.real_fake(features).squeeze(1) + (self.class_projection(labels) * features).sum(1)


def build(kind: str, latent_dim: int | None = None, hidden: int | None = None) -> CVAE | CGAN:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    d = DEFAULTS[kind]
    cls = CVAE if kind == "vae" else CGAN
    return cls(latent_dim or d["latent_dim"], hidden or d["hidden"])


@lru_cache(maxsize=1)
def digits_data() -> tuple[np.ndarray, np.ndarray]:
    """Images scaled to [0, 1], shape (1797, 8, 8), and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


# ---- training --------------------------------------------------------------------------------------

def train_digits(kind: str, out_dir: Path | None = None, seconds: float = 30.0, seed: int = 0,
                 on_step: Callable[[int, dict[str, float]], bool | None] | None = None, *,
                 max_steps: int | None = None, latent_dim: int | None = None,
                 hidden: int | None = None) -> dict[str, Any]:
    """Train a ``kind`` model for ``seconds``, or for ``max_steps`` when given (a reproducible run).

    ``on_step(step, losses)`` hears every step; returning True stops training there.

    The metrics hold ``loss_before``/``loss_after`` of the kind's falling objective (VAE: negative
    ELBO per image; GAN: the gap between generated and real per-digit mean images, since the GAN's
    own two losses are a game and need not fall) and the classifier's ``digit_accuracy``.
    """
    threads = torch.get_num_threads()
    # Models this small gain nothing from intra-op threads, and OpenMP workers that spin-wait on a
    # shared machine can make each step ten times slower.
    torch.set_num_threads(1)
    try:
        return _train(kind, out_dir, seconds, seed, on_step, max_steps, latent_dim, hidden)
    finally:
        torch.set_num_threads(threads)


def _train(kind: str, out_dir: Path | None, seconds: float, seed: int,
           on_step: Callable[[int, dict[str, float]], bool | None] | None, max_steps: int | None,
           latent_dim: int | None, hidden: int | None) -> dict[str, Any]:
    torch.manual_seed(seed)  # weight initialisation
    model = build(kind, latent_dim, hidden)
    x, y = (torch.from_numpy(a) for a in digits_data())
    gen = torch.Generator().manual_seed(seed)
    step_fn = _vae_steps(model, x, y, gen) if isinstance(model, CVAE) else _gan_steps(model, x, y, gen)
    before = _objective(model, x, y)
    t0 = time.perf_counter()
    step = 0
    last: dict[str, float] = {}
    while step < max_steps if max_steps is not None else time.perf_counter() - t0 < seconds:
        last = next(step_fn)
        step += 1
        if on_step is not None and on_step(step, last):
            break  # the caller asked to stop (a cancelled job, a lost lease)
    model.eval()
    metrics = {
        "kind": kind, "steps": step, "seconds": round(time.perf_counter() - t0, 2), "seed": seed,
        "batch_size": DEFAULTS[kind]["batch_size"], "objective": "neg_elbo" if kind == "vae" else "class_mean_gap",
        "loss_before": round(before, 5), "loss_after": round(_objective(model, x, y), 5),
        **{f"{k}_last": round(v, 5) for k, v in last.items()},
        **recognition_accuracy(model, per_digit=50, seed=seed + 1),
    }
    if out_dir is not None:
        save(model, out_dir, metrics)
    return metrics


def _batches(n: int, batch: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    while True:
        order = torch.randperm(n, generator=gen)
        for i in range(0, n - batch + 1, batch):
            yield order[i : i + batch]


def _vae_steps(model: CVAE, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> Iterator[dict[str, float]]:
    opt = torch.optim.Adam(model.parameters(), lr=DEFAULTS["vae"]["learning_rate"])
    model.train()
    for idx in _batches(len(x), DEFAULTS["vae"]["batch_size"], gen):
        losses = model.loss(x[idx], y[idx], gen)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()
        yield {k: float(v.detach()) for k, v in losses.items()}


def _gan_steps(model: CGAN, x: torch.Tensor, y: torch.Tensor,
               gen: torch.Generator) -> Iterator[dict[str, float]]:
    """Alternating updates of the min-max game, with the non-saturating generator loss."""
    lr = DEFAULTS["gan"]["learning_rate"]
    opt_d = torch.optim.Adam([*model.discriminator.parameters(), *model.real_fake.parameters(),
                              *model.class_projection.parameters()], lr=lr, betas=(0.5, 0.999))
    opt_g = torch.optim.Adam([*model.generator.parameters(), *model.label_embed.parameters()], lr=lr,
                             betas=(0.5, 0.999))
    model.train()
    real11 = x * 2 - 1
    for idx in _batches(len(x), DEFAULTS["gan"]["batch_size"], gen):
        labels = y[idx]
        z = torch.randn(len(idx), model.latent_dim, generator=gen)
        fake = model.generate(z, labels)
        d_real, d_fake = model.score(real11[idx], labels), model.score(fake.detach(), labels)
        d_loss = (F.binary_cross_entropy_with_logits(d_real, torch.full_like(d_real, 0.9))  # one-sided smoothing
                  + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        g_score = model.score(fake, labels)
        g_loss = F.binary_cross_entropy_with_logits(g_score, torch.ones_like(g_score))
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        yield {"d_loss": float(d_loss.detach()), "g_loss": float(g_loss.detach())}


@torch.no_grad()
def _objective(model: CVAE | CGAN, x: torch.Tensor, y: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    if isinstance(model, CVAE):
        value = float(model.loss(x, y, gen)["loss"])
    else:
        labels = torch.arange(NUM_CLASSES).repeat_interleave(64)
        fake = model.decode(torch.randn(len(labels), model.latent_dim, generator=gen), labels)
        gaps = [(fake[labels == c].mean(0) - x[y == c].mean(0)).pow(2).mean() for c in range(NUM_CLASSES)]
        value = float(torch.stack(gaps).mean())
    model.train(was_training)
    return value


DEMO_STEPS = {"gan": 1500, "vae": 1000}  # about 25 s and 4 s on one CPU core
DEMO_NAMES = {"demo-digits": "vae", "demo-digits-vae": "vae", "demo-digits-gan": "gan"}


@lru_cache(maxsize=2)
def _demo_state(kind: str) -> tuple[dict[str, torch.Tensor], str]:
    with tempfile.TemporaryDirectory() as tmp:
        train_digits(kind, Path(tmp), seed=0, max_steps=DEMO_STEPS[kind])
        return load_file(str(Path(tmp) / "model.safetensors")), (Path(tmp) / "config.json").read_text()


def demo_model(name: str = "demo-digits") -> tuple[CVAE | CGAN, dict[str, Any]]:
    """The built-in demo model, trained in memory for a fixed number of steps (once per process)."""
    if name not in DEMO_NAMES:
        raise ValueError(f"unknown built-in digits model {name!r}; known: {', '.join(DEMO_NAMES)}")
    state, config_text = _demo_state(DEMO_NAMES[name])
    config = json.loads(config_text)
    model = build(config["kind"], config["latent_dim"], config["hidden"])
    model.load_state_dict(state)
    return model.eval(), config


def ensure_demo_digits(out_dir: Path, name: str = "demo-digits") -> Path:
    """A saved copy of the demo model in ``out_dir``, trained only if it is not there yet."""
    out_dir = Path(out_dir)
    if not (out_dir / "config.json").is_file():
        model, config = demo_model(name)
        save(model, out_dir, config["training"])
    return out_dir


# ---- one directory format ---------------------------------------------------------------------------

def save(model: CVAE | CGAN, out_dir: Path, metrics: dict[str, Any] | None = None) -> Path:
    """``config.json`` + ``model.safetensors`` (a GAN keeps its discriminator, so training can resume)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The first layers are built in __init__ as nn.Linear / nn.Conv2d; Sequential indexes as a plain Module.
    if isinstance(model, CVAE):
        kind, hidden = "vae", cast(nn.Linear, model.encoder[0]).out_features
    else:
        kind, hidden = "gan", cast(nn.Conv2d, model.discriminator[0]).out_channels
    config = {
        "format": FORMAT, "format_version": 1, "kind": kind, "architecture": type(model).__name__,
        "latent_dim": model.latent_dim, "hidden": hidden, "image_size": IMAGE_SIZE, "channels": 1,
        "num_classes": NUM_CLASSES, "pixel_range": [0, 1], "output_size": 64,
        "dataset": "sklearn.datasets.load_digits", "training": metrics or {},
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": FORMAT, "kind": kind})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out_dir


def load(path: Path, device: str = "cpu", dtype: torch.dtype | None = None) -> tuple[CVAE | CGAN, dict[str, Any]]:
    """The model (in eval mode) and its config; raises ValueError or OSError on a directory of another kind."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if config.get("format") != FORMAT:
        raise ValueError(f"{path} is not an {FORMAT} model (config format {config.get('format')!r})")
    model = build(config["kind"], config["latent_dim"], config["hidden"])
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model.to(device=device, dtype=dtype or torch.float32).eval(), config


# ---- is it the digit asked? -------------------------------------------------------------------------

@lru_cache(maxsize=1)
def digit_classifier():
    """An RBF SVC on all of ``load_digits``: about 99% on held-out real digits."""
    from sklearn.svm import SVC

    images, labels = digits_data()
    return SVC(gamma=0.001 * 16 * 16, C=10.0).fit(images.reshape(len(images), -1), labels)


def classify(images01: np.ndarray) -> np.ndarray:
    """Digit labels for images in [0, 1] of shape (n, 8, 8)."""
    return digit_classifier().predict(np.asarray(images01, dtype=np.float32).reshape(len(images01), -1))


@torch.no_grad()
def recognition_accuracy(model: CVAE | CGAN, per_digit: int = 50, seed: int = 0) -> dict[str, Any]:
    """The share of samples the classifier reads as the digit they were asked for, overall and per digit."""
    was_training = model.training
    model.eval()
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_digit)
    z = torch.randn(len(labels), model.latent_dim, generator=torch.Generator().manual_seed(seed))
    param = next(model.parameters())
    images = model.decode(z.to(param), labels.to(param.device)).float().cpu().numpy()
    model.train(was_training)
    hit = classify(images) == labels.numpy()
    return {"digit_accuracy": round(float(hit.mean()), 4),
            "digit_accuracy_per_digit": [round(float(hit[labels.numpy() == c].mean()), 3) for c in range(NUM_CLASSES)]}
