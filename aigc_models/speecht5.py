"""SpeechT5 text to speech through transformers: the model makes a mel spectrogram for a speaker's
x-vector, the HiFi-GAN vocoder in the checkpoint's ``vocoder/`` folder makes the waveform. Loaded by
the ``hf-tts`` backend for model_type "speecht5"."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from aigc_models.audio import load_transformers, model_size, seeded, wav_output
from aigc_models.base import Backend, BackendError, GenRequest, Output
from aigc_models.params import SpeechT5Params

# Speaker x-vectors in the model directory: one (dim,) vector or (speakers, dim) rows; the first found.
SPEAKER_FILES = ("speaker_embeddings.safetensors", "speaker_embeddings.npy")


def read_speakers(path: Path, dim: int) -> np.ndarray:
    """The checkpoint's speaker x-vectors as float32 ``(speakers, dim)``; a clear error when absent."""
    for name in SPEAKER_FILES:
        f = path / name
        if not f.is_file():
            continue
        try:
            if name.endswith(".npy"):
                rows = np.load(f, allow_pickle=False)
            else:
                from safetensors.numpy import load_file

                tensors = load_file(str(f))
                rows = tensors.get("speaker_embeddings", next(iter(tensors.values()), np.zeros(0)))
        except (OSError, ValueError) as e:
            raise BackendError(f"cannot read {f}: {e}") from e
        rows = np.asarray(rows, dtype=np.float32)
        rows = rows[None, :] if rows.ndim == 1 else rows
        if rows.ndim != 2 or rows.shape[1] != dim or rows.shape[0] == 0:
            raise BackendError(f"{f}: speaker embeddings must be shaped ({dim},) or (speakers, {dim}), "
                               f"not {tuple(rows.shape)}")
        if not np.isfinite(rows).all():
            raise BackendError(f"{f}: speaker embeddings hold NaN or infinite values")
        return rows
    raise BackendError(f"SpeechT5 speaks with a speaker's x-vector: put {SPEAKER_FILES[0]} or {SPEAKER_FILES[1]} "
                       f"({dim} floats, or one row of {dim} per speaker) in {path}")


class SpeechT5Generator(Backend):
    """A SpeechT5ForTextToSpeech checkpoint, its tokenizer, its HiFi-GAN vocoder and speaker x-vectors.

    Params: ``speaker_id``, the row of the speaker embeddings file (default 0). SpeechT5's decoder
    prenet applies dropout even at inference (as Tacotron 2 does), drawn from the global RNG, one mask
    for a whole batch; so each item runs alone under its own seed, reproducible alone and in any batch.
    """

    Params = SpeechT5Params

    def __init__(self, model, vocoder, tokenizer, speakers: np.ndarray, device: str, source: Path):
        self.model = model
        self.vocoder = vocoder
        self.tokenizer = tokenizer
        self.speakers = speakers
        self.device = device
        self.source = source
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: Path, device: str = "cpu", dtype: str | None = None) -> SpeechT5Generator:
        from transformers import AutoTokenizer, SpeechT5ForTextToSpeech, SpeechT5HifiGan

        from aigc_models.device import default_dtype

        load_transformers(path, "SpeechT5")
        path = Path(path)
        if not (path / "vocoder" / "config.json").is_file():
            raise BackendError(f"cannot load a SpeechT5 model from {path}: it needs its HiFi-GAN vocoder "
                               "(SpeechT5HifiGan, e.g. microsoft/speecht5_hifigan) saved in vocoder/")
        torch_dtype = default_dtype(device, dtype)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model: Any = SpeechT5ForTextToSpeech.from_pretrained(
                path, dtype=torch_dtype, use_safetensors=True, local_files_only=True)
            vocoder: Any = SpeechT5HifiGan.from_pretrained(
                path / "vocoder", dtype=torch_dtype, use_safetensors=True, local_files_only=True)
        except (OSError, ValueError, KeyError, ImportError) as e:
            raise BackendError(f"cannot load a SpeechT5 model from {path}: {e}") from e
        speakers = read_speakers(path, int(model.config.speaker_embedding_dim))
        return cls(model.to(device).eval(), vocoder.to(device).eval(), tokenizer, speakers, device, path)

    @property
    def sample_rate(self) -> int:
        return int(self.vocoder.config.sampling_rate)  # the vocoder makes the waveform

    def memory_bytes(self) -> int:
        return model_size(self.model, self.vocoder) + self.speakers.nbytes

    def describe(self) -> dict[str, Any]:
        return {
            "class": type(self.model).__name__, "vocoder": type(self.vocoder).__name__,
            "parameters": sum(p.numel() for m in (self.model, self.vocoder) for p in m.parameters()),
            "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
            "device": self.device, "sample_rate": self.sample_rate, "speakers": len(self.speakers),
        }

    def check_group(self, params: dict[str, Any]) -> None:
        if not 0 <= int(params["speaker_id"]) < len(self.speakers):
            raise BackendError(f"speaker_id must be in 0..{len(self.speakers) - 1} (rows of the speaker "
                               "embeddings file)")

    def _run(self, params: dict[str, Any], reqs: list[GenRequest]) -> list[Output]:
        t0 = time.perf_counter()
        limit = int(self.model.config.max_text_positions)
        encoded = [self.tokenizer(r.prompt, return_tensors="pt")["input_ids"] for r in reqs]
        for r, ids in zip(reqs, encoded, strict=True):
            if ids.shape[1] > limit:
                raise BackendError(f"item {r.index}: the text is {ids.shape[1]} tokens, over the model's "
                                   f"limit of {limit}")
        waves = self._forward(encoded, params, [r.seed for r in reqs])
        return self.postprocess(reqs, waves, params, time.perf_counter() - t0)

    def _forward(self, encoded, params: dict[str, Any], seeds: list[int]) -> list[np.ndarray]:
        import torch

        dtype = next(self.model.parameters()).dtype
        speaker = torch.from_numpy(self.speakers[params["speaker_id"]][None, :]).to(self.device, dtype)
        waves = []
        with self._lock, torch.inference_mode():
            for ids, seed in zip(encoded, seeds, strict=True):
                with seeded(self.device, seed):
                    wave = self.model.generate_speech(ids.to(self.device), speaker, vocoder=self.vocoder)
                waves.append(wave.reshape(-1).float().cpu().numpy())
        return waves

    def postprocess(self, reqs, waves: list[np.ndarray], params, seconds: float) -> list[Output]:
        info = {"speaker_id": params["speaker_id"], "batch_size": len(reqs), "batch_seconds": round(seconds, 4)}
        return [wav_output(w, self.sample_rate, {"seed": int(r.seed), **info})
                for r, w in zip(reqs, waves, strict=True)]
