"""Every backend's parameters, declared once: name, type, range, project default and a line of doc.

The submit side validates a job against the model's contract (``aigc_core.spec`` looks it up here by
the registry's backend name, and for ``hf-tts`` by the checkpoint's ``model_type``); the backends take
their project defaults from the same class at run time. Nothing else repeats a default or a range.

Why this module lives in ``aigc_models`` and not in ``aigc_core``: DESIGN fixes the import direction
``aigc_models -> nothing of ours``, so a backend could not import its defaults from ``aigc_core``;
``aigc_core`` (the contract the scheduler imports) imports this module lazily, inside functions. It
imports pydantic only, never torch (tests/unit/test_params.py checks that in a fresh interpreter), so
``aigc submit`` stays torch-free.

A field's value None means "not set": the backend then takes the checkpoint's own value where it has
one, else the project default recorded on the field (``project_defaults``). That is how provenance can
say where each value came from.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


def param(default: Any, doc: str, **constraints: Any) -> Any:
    """A parameter field: unset (None) at submit, ``default`` when neither request nor checkpoint sets it."""
    return Field(None, description=doc, json_schema_extra={"project_default": default}, **constraints)


class BackendParams(BaseModel):
    """The base of every contract: unknown names are refused, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def project_defaults(cls) -> dict[str, Any]:
        """Each parameter's project default (None: the model's own choice, e.g. a pipeline's native size)."""
        out = {}
        for name, f in cls.model_fields.items():
            extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
            out[name] = extra.get("project_default")
        return out


# ---- text ---------------------------------------------------------------------------------------------

class TextParams(BackendParams):
    """``hf-causal-lm``: any transformers causal LM directory."""

    max_new_tokens: int | None = param(128, "tokens to generate at most (never taken from the checkpoint)", ge=1)
    temperature: float | None = param(1.0, "sampling temperature; 0 means greedy", ge=0.0, le=10.0)
    top_p: float | None = param(1.0, "nucleus sampling: keep the fewest tokens whose probability reaches this",
                                gt=0.0, le=1.0)
    top_k: int | None = param(0, "keep the k likeliest tokens; 0: no top-k cut", ge=0)
    repetition_penalty: float | None = param(1.0, "penalty on tokens already in the text (1: none)", gt=0.0, le=10.0)
    do_sample: bool | None = param(True, "sample; false: greedy")
    stop_at_eos: bool | None = param(True, "end an item at an EOS id (off only for fixed-length benchmarks)")
    echo: bool | None = param(False, "put the prompt in front of the output")
    stop: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = param(
        None, "up to 4 strings, as OpenAI's: the output is cut before the first one generated", max_length=4)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


# ---- image --------------------------------------------------------------------------------------------

class DiffusersParams(BackendParams):
    """``diffusers``: any diffusers pipeline directory (unconditional pipelines ignore the prompt)."""

    num_inference_steps: int | None = param(25, "denoising steps", ge=1)
    guidance_scale: float | None = param(7.5, "classifier-free guidance (text-conditioned pipelines)", ge=0.0, le=30.0)
    height: int | None = param(None, "pixels, a multiple of 8 (default: the pipeline's own)", ge=8, le=4096,
                               multiple_of=8)
    width: int | None = param(None, "pixels, a multiple of 8 (default: the pipeline's own)", ge=8, le=4096,
                              multiple_of=8)
    negative_prompt: str | None = param(None, "what the image should not show", max_length=2000)
    eta: float | None = param(0.0, "DDIM's eta (0: deterministic)", ge=0.0, le=1.0)


class DigitsParams(BackendParams):
    """``digits``: the project's 8x8 digit GAN / VAE."""

    digit: int | None = param(None, "the digit to draw (default: one digit in the prompt, else the seed's)",
                              ge=0, le=9)
    size: int | None = param(None, "output side in pixels (default: the model's output size)", ge=8, le=1024)
    resample: Literal["nearest", "bilinear"] | None = param("nearest", "how the 8x8 image is scaled up")
    invert: bool | None = param(False, "dark digit on light ground")
    temperature: float | None = param(1.0, "scale of the latent noise", ge=0.0, le=3.0)


# ---- audio --------------------------------------------------------------------------------------------

class EspeakParams(BackendParams):
    """``espeak``: weightless espeak-ng speech."""

    voice: str | None = param(None, "an espeak-ng voice (default: the model's, e.g. en)",
                              pattern=r"^[A-Za-z0-9_+\-]{1,40}$")
    rate: int | None = param(175, "words per minute", ge=80, le=450)
    pitch: int | None = param(50, "pitch, 0-100", ge=0, le=100)


class VitsParams(BackendParams):
    """``hf-tts`` with model_type vits (MMS-TTS): None leaves the checkpoint's own value."""

    speaking_rate: float | None = param(None, "speed (the checkpoint's, usually 1)", ge=0.1, le=10.0)
    noise_scale: float | None = param(None, "noise of the prior (the checkpoint's)", ge=0.0, le=2.0)
    noise_scale_duration: float | None = param(None, "noise of the durations (the checkpoint's)", ge=0.0, le=2.0)
    speaker_id: int | None = param(None, "a multi-speaker model's speaker", ge=0)


class MusicgenParams(BackendParams):
    """``hf-tts`` with model_type musicgen: text to music."""

    duration: float | None = param(8.0, "seconds of audio (wins over max_new_tokens; the default applies only "
                                   "when neither the request nor the checkpoint sets max_new_tokens)",
                                   gt=0.0, le=600.0)
    max_new_tokens: int | None = param(None, "decoder steps, instead of a duration", ge=1, le=30_000)
    guidance_scale: float | None = param(3.0, "classifier-free guidance", ge=0.0, le=30.0)
    temperature: float | None = param(1.0, "sampling temperature; 0 means greedy", ge=0.0, le=10.0)
    top_k: int | None = param(250, "keep the k likeliest codes", ge=0, le=100_000)


class SpeechT5Params(BackendParams):
    """``hf-tts`` with model_type speecht5: the speaker is a row of the checkpoint's x-vectors file."""

    speaker_id: int | None = param(0, "row of speaker_embeddings.safetensors / .npy", ge=0)


class HFAudioParams(VitsParams, MusicgenParams, SpeechT5Params):
    """``hf-tts`` when the checkpoint's model_type is not known at submit: any of its architectures'."""


# Every parameter a kind's backends know: what a model with a backend outside this table (a plugin
# named in AIGC_BACKENDS) is validated against.
class ImageParams(DiffusersParams, DigitsParams):
    """Any image backend's parameters."""


class AudioParams(EspeakParams, HFAudioParams):
    """Any audio backend's parameters."""


BY_BACKEND: dict[str, type[BackendParams]] = {
    "hf-causal-lm": TextParams,
    "diffusers": DiffusersParams,
    "digits": DigitsParams,
    "hf-tts": HFAudioParams,
    "espeak": EspeakParams,
}
# The ``hf-tts`` backend runs a class per config.json model_type (aigc_models.audio.ARCHITECTURES).
BY_ARCHITECTURE: dict[str, dict[str, type[BackendParams]]] = {
    "hf-tts": {"vits": VitsParams, "musicgen": MusicgenParams, "speecht5": SpeechT5Params},
}
BY_KIND: dict[str, type[BackendParams]] = {"text": TextParams, "image": ImageParams, "audio": AudioParams}


def params_for(backend: str, kind: str, model_type: str | None = None) -> type[BackendParams]:
    """The contract a model's jobs are validated against: its architecture's, its backend's, else its kind's."""
    by_arch = BY_ARCHITECTURE.get(backend, {})
    if model_type is not None and model_type in by_arch:
        return by_arch[model_type]
    return BY_BACKEND.get(backend) or BY_KIND[kind]
