"""Fine-tuning a diffusers pipeline on an image folder, as diffusers' example scripts do it.

Text-to-image (a UNet2DConditionModel with a VAE and a text encoder): LoRA on the UNet's attention
projections (``to_q``/``to_k``/``to_v``/``to_out.0``, gaussian init, alpha = rank), as
``train_text_to_image_lora.py``; or the whole UNet. Unconditional (a UNet2DModel, DDPM/DDIM): the
whole UNet, as ``train_unconditional.py``. The loss is the MSE between the UNet's prediction and the
scheduler's target (the noise, or the velocity) at a random timestep.

The result is a complete pipeline directory with the LoRA merged into the UNet, so it loads through
the unchanged image backend and the registry's digest covers the exact weights that generate. Each
step's noise, timesteps, crops and flips come from a generator seeded by (seed, step) and each epoch's
order from (seed, epoch): a run resumed from a checkpoint continues exactly as it would have.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aigc_models.finetune import DatasetError
from aigc_models.image_data import ImageFinetuneConfig, ImageRecord
from aigc_models.train_loop import Run, check_resumable, read_state, records_sha256, train_loop, training_state

RESUME_KEYS = ("seed", "resolution", "batch_size", "lora", "rank", "lora_alpha", "center_crop", "random_flip")
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
EVAL_IMAGES, EVAL_TIMESTEPS = 4, (0.1, 0.35, 0.6, 0.85)  # the fixed-noise evaluation: images x timesteps


def finetune_diffusion(
    base_dir: Path | str, data_dir: Path | str, records: Sequence[ImageRecord], out_dir: Path,
    cfg: ImageFinetuneConfig, *, resume_from: Path | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    on_checkpoint: Callable[[Path, dict[str, Any]], None] | None = None,
    should_stop: Callable[[], bool] | None = None, checkpoint_dir: Path | None = None,
    validation_dir: Path | None = None, device: str = "auto",
) -> dict[str, Any]:
    """Train on ``records`` (files under ``data_dir``) and write the fine-tuned pipeline to ``out_dir``.

    ``should_stop`` is asked before every step; when it answers true the run checkpoints and returns
    with ``interrupted`` set. With ``validation_dir``, the base and the result each draw the
    validation prompts (or samples) with the same seeds into ``before-NN.png`` / ``after-NN.png``.
    """
    import torch

    from aigc_models.device import resolve_device

    if not records:
        raise DatasetError("no images to fine-tune on")
    device = resolve_device(device)
    out_dir, base_dir = Path(out_dir), Path(base_dir)
    state = read_state(Path(resume_from)) if resume_from else None
    fingerprint = records_sha256(records)
    if state:
        check_resumable(state, cfg, fingerprint, RESUME_KEYS)
    gpus = [torch.device(device).index or 0] if device.startswith("cuda") else []
    with torch.random.fork_rng(devices=gpus):
        torch.manual_seed(cfg.seed)  # the LoRA's initial weights
        m = _Models.load(base_dir, cfg, device)
        params = [p for p in m.unet.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=1e-2)
        run = Run(cfg, fingerprint, len(records))
        data = _Data(Path(data_dir), list(records), m, cfg)
        evaluation = data.eval_set()
        if state:
            assert resume_from is not None
            run.restore(state, m.unet, opt, Path(resume_from))
        else:
            run.eval_before = m.eval_loss(evaluation)
        reason = train_loop(run, m, data, opt, params, evaluation, Path(checkpoint_dir or out_dir / "checkpoints"),
                             on_event, on_checkpoint, should_stop)
    metrics = run.metrics(reason)
    if reason != "interrupted":
        m.save(out_dir, {"config": cfg.to_dict(), "metrics": metrics})
        if validation_dir is not None:
            metrics["validation_images"] = validation_images(base_dir, out_dir, cfg, m.conditional, validation_dir,
                                                             device)
    return metrics


class _Models:
    """The pipeline's parts as training uses them: the UNet (LoRA'd or whole), the frozen encoders."""

    def __init__(self, pipe, cfg: ImageFinetuneConfig, device: str):
        from diffusers import DDPMScheduler

        self.pipe, self.cfg, self.device = pipe, cfg, device
        self.unet = pipe.unet
        self.conditional = all(getattr(pipe, k, None) is not None for k in ("vae", "text_encoder", "tokenizer"))
        self.noise = DDPMScheduler.from_config(pipe.scheduler.config)  # the training noise schedule
        down = 2 ** (len(self.unet.config.block_out_channels) - 1)
        side = _side(self.unet.config.sample_size)
        if self.conditional:
            self.vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
            native = side * self.vae_factor
        else:
            if any(getattr(pipe, k, None) is not None for k in ("vae", "vqvae")) or "prompt" in _call_params(pipe):
                raise ValueError(f"{type(pipe).__name__}: only text-to-image (UNet2DConditionModel + VAE + text "
                                 "encoder) and unconditional UNet2DModel pipelines can be fine-tuned")
            self.vae_factor, native = 1, side
            if cfg.lora:
                raise ValueError("an unconditional UNet is fine-tuned whole: set lora to false")
        self.resolution = cfg.resolution or native
        if not self.conditional and self.resolution != native:
            raise ValueError(f"resolution {self.resolution}: this unconditional UNet makes only {native}x{native}")
        if self.resolution % (self.vae_factor * down):
            raise ValueError(f"resolution {self.resolution} must be a multiple of {self.vae_factor * down} "
                             "for this model")

    @classmethod
    def load(cls, base_dir: Path, cfg: ImageFinetuneConfig, device: str) -> _Models:
        import torch
        from diffusers import DiffusionPipeline
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        pipe = DiffusionPipeline.from_pretrained(base_dir, use_safetensors=True, local_files_only=True,
                                                 dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        m = cls(pipe, cfg, device)
        for part in ("vae", "text_encoder"):
            if getattr(pipe, part, None) is not None:
                getattr(pipe, part).requires_grad_(False).eval()
        m.unet.requires_grad_(not cfg.lora)
        if cfg.lora:
            from aigc_models.finetune import _peft

            m.unet.add_adapter(_peft().LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha or cfg.rank,
                                          init_lora_weights="gaussian", target_modules=LORA_TARGETS))
        pipe.to(device)
        m.unet.train()
        return m

    def encode(self, pixels, texts: Sequence[str | None], gen, *, mean: bool = False):
        """Training inputs: (latents or pixels, text states or None)."""
        import torch

        with torch.no_grad():
            if not self.conditional:
                return pixels.to(self.device), None
            dist = self.pipe.vae.encode(pixels.to(self.device)).latent_dist
            latents = (dist.mean if mean else dist.sample(generator=gen)) * self.pipe.vae.config.scaling_factor
            tok = self.pipe.tokenizer
            ids = tok([t or "" for t in texts], padding="max_length", max_length=tok.model_max_length,
                      truncation=True, return_tensors="pt").input_ids
            return latents, self.pipe.text_encoder(ids.to(self.device), return_dict=False)[0]

    def loss(self, latents, states, noise, timesteps):
        import torch.nn.functional as F

        t = timesteps.to(self.device)
        noisy = self.noise.add_noise(latents, noise.to(self.device), t)
        kind = self.noise.config.prediction_type
        if kind == "epsilon":
            target = noise.to(self.device)
        elif kind == "v_prediction":
            target = self.noise.get_velocity(latents, noise.to(self.device), t)
        else:  # "sample"
            target = latents
        pred = self.unet(noisy, t, states).sample if states is not None else self.unet(noisy, t).sample
        return F.mse_loss(pred.float(), target.float())

    def eval_loss(self, evaluation) -> float:
        import torch

        self.unet.eval()
        with torch.no_grad():
            value = self.loss(*evaluation).item()
        self.unet.train()
        return value

    def trainable(self) -> dict:
        return training_state(self.unet)

    def save(self, out_dir: Path, card: dict[str, Any]) -> None:
        """The whole pipeline, the LoRA merged into the UNet; the adapter alone too, under ``lora/``."""
        self.unet.eval()
        lora_layers = None
        if self.cfg.lora:
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            lora_layers = {k: v.to("cpu").contiguous() for k, v in
                           convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet)).items()}
            self.unet.fuse_lora()
            self.unet.unload_lora()
        out_dir.mkdir(parents=True, exist_ok=True)
        self.pipe.to("cpu").save_pretrained(out_dir, safe_serialization=True)
        if lora_layers is not None and hasattr(self.pipe, "save_lora_weights"):
            self.pipe.save_lora_weights(out_dir / "lora", unet_lora_layers=lora_layers, safe_serialization=True)
        (out_dir / "finetune.json").write_text(json.dumps(card, indent=1))


def _side(sample_size: int | Sequence[int]) -> int:
    """A UNet's sample size as one side (a square's; the height of a (height, width) pair)."""
    return sample_size if isinstance(sample_size, int) else int(sample_size[0])


def _call_params(pipe) -> set[str]:
    import inspect

    return set(inspect.signature(pipe.__call__).parameters)


class _Data:
    """Batches read from disk as needed: resized (shorter side), cropped, maybe flipped, in [-1, 1]."""

    def __init__(self, root: Path, records: list[ImageRecord], m: _Models, cfg: ImageFinetuneConfig):
        self.root, self.records, self.m, self.cfg = root, records, m, cfg
        self.per_epoch = max(1, len(records) // cfg.batch_size) if len(records) >= cfg.batch_size else 1

    def pixels(self, rec: ImageRecord, gen=None):
        import numpy as np
        import torch
        from PIL import Image

        size = self.m.resolution
        with Image.open(self.root / rec.file_name) as f:
            rgb = f.convert("RGB")
        w, h = rgb.size
        scale = size / min(w, h)
        im = rgb.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BILINEAR)
        w, h = im.size
        if self.cfg.center_crop or gen is None:
            left, top = (w - size) // 2, (h - size) // 2
        else:
            left = int(torch.randint(0, w - size + 1, (1,), generator=gen))
            top = int(torch.randint(0, h - size + 1, (1,), generator=gen))
        x = torch.from_numpy(np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.float32))
        x = x.permute(2, 0, 1) / 127.5 - 1.0
        if self.cfg.random_flip and gen is not None and bool(torch.rand((), generator=gen) < 0.5):
            x = x.flip(-1)
        return x

    def batch(self, step: int):
        """The step's (latents, text states, noise, timesteps), all drawn from the step's own generator."""
        import torch

        cfg = self.cfg
        epoch, k = divmod(step, self.per_epoch)
        order = torch.randperm(len(self.records), generator=torch.Generator().manual_seed((cfg.seed << 20) + epoch))
        idx = [int(i) for i in order[k * cfg.batch_size : (k + 1) * cfg.batch_size]]
        if len(idx) < cfg.batch_size:  # fewer images than a batch: repeat them
            idx = [int(order[i % len(order)]) for i in range(cfg.batch_size)]
        gen = torch.Generator().manual_seed((cfg.seed << 24) + step + 1)
        recs = [self.records[i] for i in idx]
        pixels = torch.stack([self.pixels(r, gen) for r in recs])
        latents, states = self.m.encode(pixels, [r.text for r in recs], gen)
        noise = torch.randn(latents.shape, generator=gen)
        steps = torch.randint(0, self.m.noise.config.num_train_timesteps, (len(recs),), generator=gen)
        return latents, states, noise, steps

    def eval_set(self):
        """A fixed evaluation: the first few images at fixed timesteps and fixed noise, no crop or flip
        drawn: the same number before, during and after training."""
        import torch

        recs = self.records[:EVAL_IMAGES]
        rows = [r for r in recs for _ in EVAL_TIMESTEPS]
        gen = torch.Generator().manual_seed(self.cfg.seed + 7919)
        pixels = torch.stack([self.pixels(r) for r in rows])
        latents, states = self.m.encode(pixels, [r.text for r in rows], gen, mean=True)
        total = self.m.noise.config.num_train_timesteps
        steps = torch.tensor([int(f * (total - 1)) for _ in recs for f in EVAL_TIMESTEPS])
        return latents, states, torch.randn(latents.shape, generator=gen), steps


def validation_images(base_dir: Path, out_dir: Path, cfg: ImageFinetuneConfig, conditional: bool, dest: Path,
                      device: str) -> list[str]:
    """Before (the base) and after (the result) images with the same seeds, both loaded from disk as
    the image backend loads them; returns the file names written."""
    import torch
    from diffusers import DiffusionPipeline
    from PIL import Image

    count = len(cfg.validation_prompts) if conditional else cfg.validation_images
    if not count:
        return []
    dest.mkdir(parents=True, exist_ok=True)
    names = []
    for tag, src in (("before", base_dir), ("after", out_dir)):
        pipe = DiffusionPipeline.from_pretrained(src, use_safetensors=True, local_files_only=True,
                                                 dtype=torch.float32).to(device)
        pipe.set_progress_bar_config(disable=True)
        for i in range(count):
            kwargs: dict[str, Any] = {"generator": torch.Generator(device=device).manual_seed(cfg.seed + i),
                                      "num_inference_steps": cfg.validation_steps, "output_type": "np"}
            if conditional:
                size = cfg.resolution or _side(pipe.unet.config.sample_size) * pipe.vae_scale_factor
                kwargs.update(prompt=cfg.validation_prompts[i], height=size, width=size)
            with torch.inference_mode():
                image = pipe(**kwargs).images[0]
            name = f"{tag}-{i:02d}.png"
            Image.fromarray((image.clip(0, 1) * 255).round().astype("uint8")).save(dest / name)
            names.append(name)
        del pipe
    return names
