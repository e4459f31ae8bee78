"""Image backends: any diffusers pipeline directory, and the project's own 8x8 digit generators.

Both are ``Backend``s: their parameters (defaults and ranges) are declared once in
aigc_models/params.py, the base class groups requests by them and records the values that ran. Each
seeds one ``torch.Generator`` per item and writes PNG in ``postprocess`` only. Limits on steps and
sizes are the job spec's to enforce; the backends check only what the loaded model alone can tell.
"""

from __future__ import annotations

import inspect
import io
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from aigc_models.base import Backend, BackendError, GenRequest, Output
from aigc_models.device import default_dtype
from aigc_models.params import DiffusersParams, DigitsParams

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _png(pixels: np.ndarray) -> bytes:
    """uint8 HxW or HxWxC to PNG bytes; the same pixels always give the same bytes."""
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


class DiffusersImageGenerator(Backend):
    """Loads any diffusers pipeline directory; text-conditioned pipelines take the prompt, others ignore it.

    Each item's starting noise comes from its own generator, so an item alone and in a batch start
    the same. The denoising math is batched, though, and kernels for another batch size may sum in
    another order: on CPU the floats differed by under 1e-6 and the PNGs were identical in every
    test; on GPU (cuDNN picks kernels per shape; bf16) expect the odd pixel to differ by one level.
    """

    Params = DiffusersParams

    def __init__(self, pipe, device: str, source: Path):
        self.pipe = pipe
        self.device = device
        self.source = source
        self.call_params = set(inspect.signature(pipe.__call__).parameters)
        self.conditional = "prompt" in self.call_params

    @classmethod
    def load(cls, path: Path, device: str = "cpu", dtype: str | None = None) -> DiffusersImageGenerator:
        from diffusers import DiffusionPipeline
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        if not Path(path).is_dir():  # otherwise diffusers would read the path as a hub repository id
            raise BackendError(f"cannot load a diffusers pipeline from {path}: not a directory")
        try:
            pipe = DiffusionPipeline.from_pretrained(path, use_safetensors=True, local_files_only=True,
                                                     dtype=default_dtype(device, dtype))
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise BackendError(f"cannot load a diffusers pipeline from {path}: {e}") from e
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe.to(device), device, Path(path))

    def _modules(self) -> list[torch.nn.Module]:
        return [m for m in self.pipe.components.values() if isinstance(m, torch.nn.Module)]

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for m in self._modules() for t in [*m.parameters(), *m.buffers()])

    def native_size(self) -> tuple[int, int] | None:
        """The unconditional UNet's sample size (height, width): such pipelines make no other."""
        unet = getattr(self.pipe, "unet", None)
        size = getattr(getattr(unet, "config", None), "sample_size", None)
        if size is None:
            return None
        return (size, size) if isinstance(size, int) else tuple(size)

    def describe(self) -> dict[str, Any]:
        first = next((p for m in self._modules() for p in m.parameters()), None)
        return {
            "class": type(self.pipe).__name__,
            "components": {k: type(v).__name__ for k, v in self.pipe.components.items() if v is not None},
            "parameters": sum(p.numel() for m in self._modules() for p in m.parameters()),
            "dtype": str(first.dtype).removeprefix("torch.") if first is not None else None,
            "device": self.device,
            "conditional": self.conditional,
        }

    def check_group(self, params: dict[str, Any]) -> None:
        if not self.conditional and (native := self.native_size()) is not None:
            asked = (int(params["height"] or native[0]), int(params["width"] or native[1]))
            if asked != native:
                raise BackendError(f"{type(self.pipe).__name__} makes only {native[0]}x{native[1]} images")

    def _run(self, params: dict[str, Any], reqs: list[GenRequest]) -> list[Output]:
        t0 = time.perf_counter()
        images, flagged = self._forward([r.prompt for r in reqs], params, [r.seed for r in reqs])
        return self.postprocess(reqs, images, flagged, params, time.perf_counter() - t0)

    @torch.inference_mode()
    def _forward(self, prompts: list[str], params: dict[str, Any], seeds: list[int]):
        """Float images (n, H, W, C) in [0, 1] and per-image safety flags (None where no checker ran)."""
        gens = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]
        kwargs: dict[str, Any] = {
            "generator": gens, "num_inference_steps": int(params["num_inference_steps"]), "output_type": "np",
            "eta": float(params["eta"]),
        }
        if self.conditional:
            kwargs.update(prompt=prompts, guidance_scale=float(params["guidance_scale"]),
                          height=params["height"] and int(params["height"]),
                          width=params["width"] and int(params["width"]))
            if params["negative_prompt"] is not None:
                kwargs["negative_prompt"] = [str(params["negative_prompt"])] * len(prompts)
        else:
            kwargs["batch_size"] = len(prompts)
        kwargs = {k: v for k, v in kwargs.items() if k in self.call_params and v is not None}
        try:
            result = self.pipe(**kwargs)
        except (RuntimeError, ValueError) as e:
            raise BackendError(f"{type(self.pipe).__name__} failed: {e}") from e
        flagged = getattr(result, "nsfw_content_detected", None) or [None] * len(prompts)
        return np.asarray(result.images, dtype=np.float32), flagged

    def postprocess(self, reqs, images: np.ndarray, flagged, params, seconds: float) -> list[Output]:
        pixels = _to_uint8(images)
        outs = []
        for i, r in enumerate(reqs):
            info = {
                "width": int(pixels.shape[2]), "height": int(pixels.shape[1]),
                "steps": int(params["num_inference_steps"]), "seed": int(r.seed),
                "pipeline": type(self.pipe).__name__, "batch_size": len(reqs), "batch_seconds": round(seconds, 4),
            }
            if self.conditional:
                info["guidance_scale"] = float(params["guidance_scale"])
            if flagged[i] is not None:
                info["nsfw_flagged"] = bool(flagged[i])
            outs.append(Output(_png(pixels[i]), "image/png", "png", info))
        return outs


class DigitsGenerator(Backend):
    """The project's conditional GAN or VAE for 8x8 digits; the digit comes from params, prompt or seed.

    ``load`` takes a directory saved by ``aigc_models.digits.save``, or ``builtin://demo-digits``
    (``-gan``/``-vae``), which trains the demo model in memory for a fixed number of steps.
    """

    Params = DigitsParams
    per_item = ("digit",)

    def __init__(self, model, config: dict[str, Any], device: str, source: Path | str):
        self.model = model
        self.config = config
        self.device = device
        self.source = source

    @classmethod
    def load(cls, path: Path | str, device: str = "cpu", dtype: str | None = None) -> DigitsGenerator:
        from aigc_models import digits

        name = str(path).replace("builtin://", "builtin:").replace("builtin:/", "builtin:")
        try:
            if name.startswith("builtin:"):
                model, config = digits.demo_model(name.removeprefix("builtin:"))
                model = model.to(device=device, dtype=default_dtype(device, dtype))
            else:
                model, config = digits.load(Path(path), device, default_dtype(device, dtype))
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise BackendError(f"cannot load a digits model from {path}: {e}") from e
        return cls(model, config, device, path)

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.model.parameters(), *self.model.buffers()])

    def describe(self) -> dict[str, Any]:
        return {
            "class": type(self.model).__name__, "kind": self.config["kind"],
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."), "device": self.device,
            "digit_accuracy": self.config.get("training", {}).get("digit_accuracy"),
        }

    @staticmethod
    def choose_digit(r: GenRequest) -> tuple[int, str]:
        """The digit asked and where it came from: the ``digit`` param, a lone digit in the prompt, or the seed."""
        if r.params.get("digit") is not None:
            d = int(r.params["digit"])
            if not 0 <= d <= 9:
                raise BackendError(f"digit must be 0-9, not {d}")
            return d, "param"
        found = re.findall(r"\d", r.prompt)
        if len(found) == 1:
            return int(found[0]), "prompt"
        words = re.findall(r"\b(" + "|".join(DIGIT_WORDS) + r")\b", r.prompt.lower())
        if not found and len(set(words)) == 1:
            return DIGIT_WORDS.index(words[0]), "prompt"
        return int(r.seed) % 10, "seed"

    def _run(self, params: dict[str, Any], reqs: list[GenRequest]) -> list[Output]:
        t0 = time.perf_counter()
        chosen = [self.choose_digit(r) for r in reqs]
        images = self._forward([d for d, _ in chosen], [r.seed for r in reqs], float(params["temperature"]))
        return self.postprocess(reqs, images, chosen, params, time.perf_counter() - t0)

    @torch.inference_mode()
    def _forward(self, labels: list[int], seeds: list[int], temperature: float) -> np.ndarray:
        """(n, 8, 8) in [0, 1]. Each latent is drawn on the CPU from the item's own generator: same on any device.

        The decoder runs one item at a time: a batched matmul sums in another order than a single row,
        and one ulp can flip a rounded pixel. At well under a millisecond a digit, exactness is cheap.
        """
        param = next(self.model.parameters())
        outs = []
        for label, seed in zip(labels, seeds, strict=False):
            z = torch.randn(1, self.model.latent_dim, generator=torch.Generator().manual_seed(int(seed))) * temperature
            outs.append(self.model.decode(z.to(param), torch.tensor([label], device=param.device)))
        return torch.cat(outs).float().cpu().numpy()

    def postprocess(self, reqs, images: np.ndarray, chosen, params, seconds: float) -> list[Output]:
        size = int(params["size"] or self.config.get("output_size", 64))
        resample = Image.Resampling.NEAREST if params["resample"] == "nearest" else Image.Resampling.BILINEAR
        pixels = _to_uint8(1.0 - images if params["invert"] else images)
        outs = []
        for i, r in enumerate(reqs):
            img = Image.fromarray(pixels[i]).resize((size, size), resample)
            info = {
                "width": size, "height": size, "steps": 1, "seed": int(r.seed), "digit": chosen[i][0],
                "digit_source": chosen[i][1], "kind": self.config["kind"], "batch_size": len(reqs),
                "batch_seconds": round(seconds, 4),
            }
            outs.append(Output(_png(np.asarray(img)), "image/png", "png", info))
        return outs
