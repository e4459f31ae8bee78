"""Audio backends: transformers audio checkpoints (VITS / MMS-TTS here; MusicGen and SpeechT5 in their own
files), picked by the checkpoint's model_type, and weightless espeak-ng.

All write 16-bit PCM WAV in ``postprocess`` only and record sample rate, duration and sample count. Their
parameters (defaults and ranges) are declared once in aigc_models/params.py; the ``Backend`` base class
groups requests by them and records the values that ran.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import io
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from aigc_models.base import Backend, BackendError, Generator, GenRequest, Output, module_facts
from aigc_models.params import EspeakParams, VitsParams

# The `hf-tts` backend: a checkpoint's config.json model_type -> the class that runs it (MMS-TTS is VITS);
# each one's parameters are aigc_models.params.BY_ARCHITECTURE["hf-tts"][model_type].
ARCHITECTURES: dict[str, str] = {
    "vits": "aigc_models.audio:VitsGenerator",
    "musicgen": "aigc_models.musicgen:MusicgenGenerator",
    "speecht5": "aigc_models.speecht5:SpeechT5Generator",
}
SUPPORTED_TTS = tuple(ARCHITECTURES)


def wav_output(samples: np.ndarray, sample_rate: int, info: dict[str, Any]) -> Output:
    """Float in [-1, 1] (clipped) or int16, mono ``(n,)`` or ``(n, channels)``, to a PCM_16 WAV; the same
    samples give the same bytes."""
    if samples.dtype != np.int16:
        samples = np.clip(samples.astype(np.float32), -1.0, 1.0)
    buf = io.BytesIO()
    sf.write(buf, samples, sample_rate, format="WAV", subtype="PCM_16")
    n = len(samples)
    info = {"sample_rate": int(sample_rate), "duration_s": round(n / sample_rate, 4), "samples": n, **info}
    return Output(buf.getvalue(), "audio/wav", "wav", info)


@contextlib.contextmanager
def seeded(device: str, seed: int) -> Iterator[None]:
    """torch's global RNG (and the GPU's) seeded with one item's seed, restored afterwards.

    For models whose sampling reads the global RNG (VITS noise, SpeechT5's prenet dropout, MusicGen's
    ``generate``): run one item inside, and it draws the same numbers alone or among others."""
    import torch

    devices = [torch.device(device)] if device.startswith("cuda") else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


def load_transformers(path: Path, what: str) -> None:
    """Quiet transformers, and refuse a path that is not a directory (transformers would read it as a
    hub repository id and try to download it)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if not Path(path).is_dir():
        raise BackendError(f"cannot load a {what} model from {path}: not a directory")


def model_size(*modules) -> int:
    return sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])


class HFAudio:
    """The ``hf-tts`` backend: reads the checkpoint's model_type and loads the class that runs it, so any
    supported transformers audio checkpoint registers as ``--kind audio`` with no ``--backend``."""

    @classmethod
    def load(cls, path: Path, device: str = "cpu", dtype: str | None = None) -> Generator:
        path = Path(path)
        if not path.is_dir():  # never a hub lookup
            raise BackendError(f"cannot load an audio model from {path}: not a directory")
        try:
            model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError, AttributeError) as e:
            raise BackendError(f"cannot load an audio model from {path}: no readable config.json ({e})") from e
        target = ARCHITECTURES.get(str(model_type))
        if target is None:
            raise BackendError(f"cannot load an audio model from {path}: model type {model_type!r} is not "
                               f"supported (supported: {', '.join(SUPPORTED_TTS)})")
        module, _, name = target.partition(":")
        generator: Generator = getattr(importlib.import_module(module), name).load(path, device=device, dtype=dtype)
        return generator


class VitsGenerator(Backend):
    """A transformers VITS checkpoint (e.g. facebook/mms-tts-*) and its tokenizer.

    VITS draws its noise (durations and prior) with the global torch RNG over the whole batch, so a
    batched forward would make each item depend on its neighbours and their padding. Each item
    therefore runs alone under ``torch.random.fork_rng`` seeded with the item's seed: reproducible
    alone, and the process's RNG is left as it was. A VITS forward is cheap (a tiny model makes
    seconds of audio in tens of milliseconds), so little is lost.
    """

    Params = VitsParams

    def __init__(self, model, tokenizer, device: str, source: Path):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.source = source
        self._lock = threading.Lock()  # noise scales are model attributes, set per group

    @classmethod
    def load(cls, path: Path, device: str = "cpu", dtype: str | None = None) -> VitsGenerator:
        from transformers import AutoConfig, AutoModelForTextToWaveform, AutoTokenizer

        from aigc_models.device import default_dtype

        load_transformers(path, "text-to-speech")
        try:
            model_type = AutoConfig.from_pretrained(path, local_files_only=True).model_type
            if model_type != "vits":
                raise ValueError(f"model type {model_type!r} is not VITS")
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModelForTextToWaveform.from_pretrained(path, dtype=default_dtype(device, dtype),
                                                               use_safetensors=True, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise BackendError(f"cannot load a text-to-speech model from {path}: {e}") from e
        return cls(model.to(device).eval(), tokenizer, device, Path(path))

    @property
    def sample_rate(self) -> int:
        return int(self.model.config.sampling_rate)

    def memory_bytes(self) -> int:
        return model_size(self.model)

    def describe(self) -> dict[str, Any]:
        return {
            **module_facts(self.model),
            "device": self.device, "sample_rate": self.sample_rate,
            "speakers": int(getattr(self.model.config, "num_speakers", 1) or 1),
        }

    def check_group(self, params: dict[str, Any]) -> None:
        speakers = int(getattr(self.model.config, "num_speakers", 1) or 1)
        if params["speaker_id"] is not None and not 0 <= int(params["speaker_id"]) < speakers:
            raise BackendError(f"speaker_id must be in 0..{speakers - 1}")

    def _run(self, params: dict[str, Any], reqs: list[GenRequest]) -> list[Output]:
        t0 = time.perf_counter()
        encoded = [self.tokenizer(r.prompt, return_tensors="pt") for r in reqs]
        for r, enc in zip(reqs, encoded, strict=True):
            if enc["input_ids"].shape[1] == 0 or not enc["input_ids"].any():
                raise BackendError(f"item {r.index}: no character of the prompt is in the model's vocabulary")
        waves = self._forward(encoded, params, [r.seed for r in reqs])
        return self.postprocess(reqs, waves, params, time.perf_counter() - t0)

    def _forward(self, encoded, params: dict[str, Any], seeds: list[int]) -> list[np.ndarray]:
        import torch

        knobs = {k: params[k] for k in ("noise_scale", "noise_scale_duration") if params[k] is not None}
        waves = []
        with self._lock, torch.inference_mode():
            saved = {k: getattr(self.model, k) for k in knobs}
            try:
                for k, v in knobs.items():
                    setattr(self.model, k, float(v))
                for enc, seed in zip(encoded, seeds, strict=True):
                    with seeded(self.device, seed):
                        out = self.model(**enc.to(self.device), speaker_id=params["speaker_id"],
                                         speaking_rate=params["speaking_rate"])
                    n = int(out.sequence_lengths[0]) if out.sequence_lengths is not None else out.waveform.shape[-1]
                    waves.append(out.waveform[0, :n].float().cpu().numpy())
            finally:
                for k, v in saved.items():
                    setattr(self.model, k, v)
        return waves

    def postprocess(self, reqs, waves: list[np.ndarray], params, seconds: float) -> list[Output]:
        rate = params["speaking_rate"] or getattr(self.model, "speaking_rate", 1.0)
        return [wav_output(w, self.sample_rate, {"seed": int(r.seed), "speaking_rate": float(rate),
                                           "batch_size": len(reqs), "batch_seconds": round(seconds, 4)})
                for r, w in zip(reqs, waves, strict=True)]


# ---- espeak-ng through ctypes ------------------------------------------------------------------------

_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM = {"rate": 1, "pitch": 3}


class _Espeak:
    """One synthesis at a time through libespeak-ng (shipped by the espeakng-loader wheel).

    espeak-ng keeps state from one utterance to the next in static variables that neither
    espeak_Terminate nor espeak_Initialize resets: the same text came out a few samples different
    each time (identical across fresh processes). Each utterance therefore runs in a freshly loaded
    copy of the library (dlopen, synthesize, dlclose: about 5 ms), so every item is reproducible
    alone. Voices with random effects (e.g. ``en+whisper``) take the item's seed.
    """

    _lock = threading.Lock()  # the library is process-global and not reentrant

    def __init__(self):
        import espeakng_loader

        self.lib_path = espeakng_loader.get_library_path()
        self.data_path = espeakng_loader.get_data_path().encode()
        self._chunks: list[np.ndarray] = []
        self._callback = _SYNTH_CALLBACK(self._on_audio)  # kept alive as long as the library may call it
        self.sample_rate = self._with_library(lambda lib, sr: sr)

    def _on_audio(self, wav, n, events) -> int:
        if n > 0 and wav:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0  # 0: continue

    def _with_library(self, fn):
        import _ctypes

        with self._lock:
            lib = ctypes.CDLL(self.lib_path)
            try:
                lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
                sr = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, self.data_path, 0)
                if sr <= 0:
                    raise BackendError(f"espeak_Initialize failed ({sr})")
                lib.espeak_SetSynthCallback(self._callback)
                try:
                    return fn(lib, sr)
                finally:
                    lib.espeak_Terminate()
            finally:
                _ctypes.dlclose(lib._handle)

    def synthesize(self, text: str, voice: str, rate: int, pitch: int, seed: int) -> np.ndarray:
        def run(lib, sr):
            if lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise BackendError(f"espeak-ng has no voice {voice!r}")
            lib.espeak_SetParameter(_PARAM["rate"], int(rate), 0)
            lib.espeak_SetParameter(_PARAM["pitch"], int(pitch), 0)
            if hasattr(lib, "espeak_ng_SetRandSeed"):  # espeak-ng 1.52+
                lib.espeak_ng_SetRandSeed(ctypes.c_long(int(seed)))
            data = text.encode("utf-8")
            self._chunks = []
            lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                         ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
            err = lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            if err != 0:
                raise BackendError(f"espeak_Synth failed ({err})")
            chunks, self._chunks = self._chunks, []
            return np.concatenate(chunks) if chunks else np.zeros(0, np.int16)

        return self._with_library(run)


_engine: _Espeak | None = None


def _espeak() -> _Espeak:
    global _engine
    if _engine is None:
        _engine = _Espeak()
    return _engine


class EspeakGenerator(Backend):
    """Weightless English (and other) speech from espeak-ng; params voice, rate (wpm) and pitch.

    ``load`` ignores a directory path; ``builtin://espeak-en`` (or ``espeak-<voice>``) names the default voice.
    """

    Params = EspeakParams

    def __init__(self, engine: _Espeak, default_voice: str, source: Path | str):
        self.engine = engine
        self.default_voice = default_voice
        self.device = "cpu"
        self.source = source

    @classmethod
    def load(cls, path: Path | str = "builtin://espeak-en", device: str = "cpu",
             dtype: str | None = None) -> EspeakGenerator:
        name = re.sub(r"^builtin:/*", "", str(path)) if str(path).startswith("builtin:") else ""
        voice = name.removeprefix("espeak-") if name.startswith("espeak-") else "en"
        try:
            engine = _espeak()
        except (ImportError, OSError) as e:
            raise BackendError(f"cannot load espeak-ng (pip install espeakng-loader): {e}") from e
        gen = cls(engine, voice, path)
        gen._check_voice(voice)
        return gen

    def _check_voice(self, voice: str) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_+\-]{1,40}", voice):
            raise BackendError(f"bad espeak voice name {voice!r}")

    def memory_bytes(self) -> int:
        return 8 * 2**20  # the library and one language's data, roughly; no weights

    def describe(self) -> dict[str, Any]:
        return {"class": "espeak-ng", "parameters": 0, "device": "cpu", "sample_rate": self.engine.sample_rate,
                "default_voice": self.default_voice}

    def checkpoint_params(self) -> dict[str, Any]:
        return {"voice": self.default_voice}  # the model's own: the voice builtin://espeak-<voice> names

    def check_group(self, params: dict[str, Any]) -> None:
        self._check_voice(params["voice"])

    def _run(self, params: dict[str, Any], reqs: list[GenRequest]) -> list[Output]:
        t0 = time.perf_counter()
        samples = self._forward([r.prompt for r in reqs], params, [r.seed for r in reqs])
        return self.postprocess(reqs, samples, params, time.perf_counter() - t0)

    def _forward(self, texts: list[str], params: dict[str, Any], seeds: list[int]) -> list[np.ndarray]:
        return [self.engine.synthesize(t, params["voice"], params["rate"], params["pitch"], s)
                for t, s in zip(texts, seeds, strict=True)]

    def postprocess(self, reqs, samples: list[np.ndarray], params, seconds: float) -> list[Output]:
        return [wav_output(s, self.engine.sample_rate, {"voice": params["voice"], "rate": int(params["rate"]),
                                                  "pitch": int(params["pitch"]), "seed": int(r.seed),
                                                  "batch_size": len(reqs), "batch_seconds": round(seconds, 4)})
                for r, s in zip(reqs, samples, strict=True)]


# The hf-tts class's name before MusicGen and SpeechT5: "aigc_models.audio:TTSGenerator" in an
# AIGC_BACKENDS setting (or an older BACKENDS table) keeps loading every supported architecture.
TTSGenerator = HFAudio
