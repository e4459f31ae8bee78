"""MusicGen (text to music) through transformers: a T5 text encoder, a decoder over EnCodec codes, and
EnCodec turning the codes into a waveform. Loaded by the ``hf-tts`` backend for model_type "musicgen"."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from aigc_models.audio import load_transformers, model_size, seeded, wav_output
from aigc_models.base import BackendError, GenRequest, Output, group_by_params, in_order

# None: the checkpoint's generation_config.json value, else the project default below.
MUSICGEN_DEFAULTS: dict[str, Any] = {"duration": None, "max_new_tokens": None, "guidance_scale": None,
                                     "temperature": None, "top_k": None}
PROJECT_DEFAULTS: dict[str, Any] = {"duration": 8.0, "guidance_scale": 3.0, "temperature": 1.0, "top_k": 250}


class MusicgenGenerator:
    """A MusicgenForConditionalGeneration checkpoint and its tokenizer; the prompt describes the music.

    Items run one at a time, each under its own seed. ``generate`` samples every step with one
    ``torch.multinomial`` over the whole batch from the global RNG (transformers has no per-row
    generator), and classifier-free guidance doubles that batch: batched, an item's music would depend on
    which items shared its batch and where it sat. Alone under ``seeded`` it is the same bytes in any
    batch. The cost is throughput on a GPU, where a batch of items would run in about the time of one.
    """

    def __init__(self, model, tokenizer, device: str, source: Path):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.source = source
        self._lock = threading.Lock()  # generate keeps per-call state on the model (caches)

    @classmethod
    def load(cls, path: Path, device: str = "cpu", dtype: str | None = None) -> MusicgenGenerator:
        from transformers import AutoTokenizer, MusicgenForConditionalGeneration

        from aigc_models.device import default_dtype

        load_transformers(path, "MusicGen")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model: Any = MusicgenForConditionalGeneration.from_pretrained(
                path, dtype=default_dtype(device, dtype), use_safetensors=True, local_files_only=True)
        except (OSError, ValueError, KeyError, ImportError) as e:
            raise BackendError(f"cannot load a MusicGen model from {path}: {e}") from e
        return cls(model.to(device).eval(), tokenizer, device, Path(path))

    @property
    def sample_rate(self) -> int:
        return int(self.model.config.audio_encoder.sampling_rate)

    @property
    def frame_rate(self) -> float:
        """EnCodec frames (decoder steps) per second of audio."""
        return float(self.model.config.audio_encoder.frame_rate)

    def memory_bytes(self) -> int:
        return model_size(self.model)

    def describe(self) -> dict[str, Any]:
        return {
            "class": type(self.model).__name__,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
            "device": self.device, "sample_rate": self.sample_rate, "frame_rate": self.frame_rate,
            "codebooks": int(self.model.decoder.num_codebooks),
            "channels": int(self.model.config.audio_encoder.audio_channels),
        }

    def generate(self, requests: Sequence[GenRequest]) -> list[Output]:
        return in_order(requests, self._run, self.preprocess(requests))

    def preprocess(self, requests: Sequence[GenRequest]) -> list[tuple[dict[str, Any], list[int]]]:
        """Group by parameters and fill each group's unset ones: the checkpoint's, else the project's."""
        groups = group_by_params(requests, MUSICGEN_DEFAULTS)
        for params, _ in groups:
            self._resolve(params)
        return groups

    def _resolve(self, params: dict[str, Any]) -> None:
        checkpoint = self.model.generation_config
        for k in ("guidance_scale", "temperature", "top_k"):
            if params[k] is None:
                own = getattr(checkpoint, k, None)
                params[k] = own if own is not None else PROJECT_DEFAULTS[k]
        if params["duration"] is not None:  # duration wins over max_new_tokens
            if not float(params["duration"]) > 0:
                raise BackendError("duration must be above 0 seconds")
            params["max_new_tokens"] = None
        elif params["max_new_tokens"] is None:
            own = getattr(checkpoint, "max_new_tokens", None)
            if own:
                params["max_new_tokens"] = int(own)
            else:
                params["duration"] = PROJECT_DEFAULTS["duration"]
        if params["max_new_tokens"] is None:
            # The decoder delays codebook k by k steps: n frames take n + codebooks - 1 steps.
            frames = math.ceil(float(params["duration"]) * self.frame_rate)
            params["max_new_tokens"] = frames + int(self.model.decoder.num_codebooks) - 1
        if int(params["max_new_tokens"]) < 1:
            raise BackendError("max_new_tokens must be at least 1")
        if float(params["guidance_scale"]) < 0 or float(params["temperature"]) < 0 or int(params["top_k"]) < 0:
            raise BackendError("guidance_scale, temperature and top_k must not be negative")

    def _run(self, params: dict[str, Any], reqs: list[GenRequest]) -> list[Output]:
        t0 = time.perf_counter()
        encoded = [self.tokenizer(r.prompt, return_tensors="pt") for r in reqs]
        waves = self._forward(encoded, params, [r.seed for r in reqs])
        return self.postprocess(reqs, waves, params, time.perf_counter() - t0)

    def _forward(self, encoded, params: dict[str, Any], seeds: list[int]) -> list[np.ndarray]:
        import torch

        sample = float(params["temperature"]) > 0  # temperature 0: greedy, and the seed is irrelevant
        knobs: dict[str, Any] = {"do_sample": sample, "max_new_tokens": int(params["max_new_tokens"]),
                                 "guidance_scale": float(params["guidance_scale"])}
        if sample:
            knobs.update(temperature=float(params["temperature"]), top_k=int(params["top_k"]))
        waves = []
        with self._lock, torch.inference_mode():
            for enc, seed in zip(encoded, seeds, strict=True):
                with seeded(self.device, seed):
                    audio = self.model.generate(**enc.to(self.device), **knobs)
                # (1, channels, samples) -> (samples, channels), or (samples,) for mono
                wave = audio[0].float().cpu().numpy().T
                waves.append(wave[:, 0] if wave.shape[1] == 1 else wave)
        return waves

    def postprocess(self, reqs, waves: list[np.ndarray], params, seconds: float) -> list[Output]:
        if params["duration"] is not None:  # EnCodec frames overshoot by up to one frame: cut to the asked length
            n = round(float(params["duration"]) * self.sample_rate)
            waves = [w[:n] for w in waves]
        info = {"duration_requested": params["duration"], "max_new_tokens": int(params["max_new_tokens"]),
                "guidance_scale": float(params["guidance_scale"]), "temperature": float(params["temperature"]),
                "top_k": int(params["top_k"]), "batch_size": len(reqs), "batch_seconds": round(seconds, 4)}
        return [wav_output(w, self.sample_rate, {"seed": int(r.seed), **info})
                for r, w in zip(reqs, waves, strict=True)]
