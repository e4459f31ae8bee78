"""MusicGen (text to music) through transformers: a T5 text encoder, a decoder over EnCodec codes, and
EnCodec turning the codes into a waveform. Loaded by the ``hf-tts`` backend for model_type "musicgen"."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from aigc_models.audio import load_transformers, model_size, seeded, wav_output
from aigc_models.base import Backend, BackendError, GenRequest, Output, module_facts
from aigc_models.params import MusicgenParams

# What the checkpoint's generation_config.json may set for us where the request does not.
CHECKPOINT_KEYS = ("guidance_scale", "temperature", "top_k", "max_new_tokens")


class MusicgenGenerator(Backend):
    """A MusicgenForConditionalGeneration checkpoint and its tokenizer; the prompt describes the music.

    Items run one at a time, each under its own seed. ``generate`` samples every step with one
    ``torch.multinomial`` over the whole batch from the global RNG (transformers has no per-row
    generator), and classifier-free guidance doubles that batch: batched, an item's music would depend on
    which items shared its batch and where it sat. Alone under ``seeded`` it is the same bytes in any
    batch. The cost is throughput on a GPU, where a batch of items would run in about the time of one.
    """

    Params = MusicgenParams

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
            **module_facts(self.model),
            "device": self.device, "sample_rate": self.sample_rate, "frame_rate": self.frame_rate,
            "codebooks": int(self.model.decoder.num_codebooks),
            "channels": int(self.model.config.audio_encoder.audio_channels),
        }

    def checkpoint_params(self) -> dict[str, Any]:
        """The checkpoint's generation_config values (a max_new_tokens of 0 or none is no value)."""
        checkpoint = self.model.generation_config
        own = {k: getattr(checkpoint, k, None) for k in CHECKPOINT_KEYS}
        own["max_new_tokens"] = int(own["max_new_tokens"]) if own["max_new_tokens"] else None
        return own

    def adjust(self, params: dict[str, Any], sources: dict[str, str]) -> None:
        """A duration the request sets wins over max_new_tokens; the project's default duration applies
        only when neither the request nor the checkpoint gives max_new_tokens."""
        if sources["duration"] != "default" or params["max_new_tokens"] is None:
            # The decoder delays codebook k by k steps: n frames take n + codebooks - 1 steps.
            frames = math.ceil(float(params["duration"]) * self.frame_rate)
            params["max_new_tokens"] = frames + int(self.model.decoder.num_codebooks) - 1
            sources["max_new_tokens"] = "duration"
        else:
            params["duration"], sources["duration"] = None, "max_new_tokens"

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
