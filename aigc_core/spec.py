"""The job spec: what a user submits, validated before anything is written."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from aigc_core.errors import SpecError
from aigc_core.settings import Limits

Kind = Literal["text", "image", "audio"]
KINDS: tuple[str, ...] = ("text", "image", "audio")


class TextParams(BaseModel):
    """Sampling parameters of the text backend; unknown names are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=10.0)  # 0 means greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    do_sample: bool = True
    # Off only for benchmarks that need fixed token counts.
    stop_at_eos: bool = True
    # Put the prompt in front of the output (a headline prompt then gives the whole article).
    echo: bool = False


class ImageParams(BaseModel):
    """Image parameters; None leaves the backend's (or the checkpoint's) default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_inference_steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0.0, le=30.0)
    height: int | None = Field(None, ge=8, le=4096, multiple_of=8)
    width: int | None = Field(None, ge=8, le=4096, multiple_of=8)
    negative_prompt: str | None = Field(None, max_length=2000)
    eta: float | None = Field(None, ge=0.0, le=1.0)
    # the project's digits models (GAN / VAE)
    digit: int | None = Field(None, ge=0, le=9)
    size: int | None = Field(None, ge=8, le=1024)
    resample: Literal["nearest", "bilinear"] | None = None
    invert: bool | None = None
    temperature: float | None = Field(None, ge=0.0, le=3.0)


class AudioParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # espeak-ng
    voice: str | None = Field(None, pattern=r"^[A-Za-z0-9_+\-]{1,40}$")
    rate: int | None = Field(None, ge=80, le=450)  # words per minute
    pitch: int | None = Field(None, ge=0, le=100)
    # VITS / MMS-TTS
    speaking_rate: float | None = Field(None, ge=0.1, le=10.0)
    noise_scale: float | None = Field(None, ge=0.0, le=2.0)
    noise_scale_duration: float | None = Field(None, ge=0.0, le=2.0)
    speaker_id: int | None = Field(None, ge=0)


PARAMS_BY_KIND: dict[str, type[BaseModel]] = {"text": TextParams, "image": ImageParams, "audio": AudioParams}


class SourceRef(BaseModel):
    """An item whose input is another job's text output, read when the item runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job: str = Field(min_length=1, max_length=32)
    custom_id: str = Field(min_length=1, max_length=128)


class ItemSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    custom_id: str | None = None
    prompt: str = ""
    text: str | None = None  # audio items may say "text"; it is the prompt
    source: SourceRef | None = Field(None, alias="from")
    params: dict[str, Any] = Field(default_factory=dict)

    @property
    def input_text(self) -> str:
        return self.text if self.text is not None else self.prompt

    @field_validator("custom_id")
    @classmethod
    def _custom_id(cls, v: str | None) -> str | None:
        if v is not None and (not v or not v.isprintable()):
            raise ValueError("custom_id must be a non-empty printable string")
        return v


class JobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Kind
    model: str = Field(min_length=1, max_length=160)
    items: list[ItemSpec]
    params: dict[str, Any] = Field(default_factory=dict)
    seed: int | None = Field(None, ge=0, lt=2**62)
    idempotency_key: str | None = Field(None, min_length=1, max_length=200)
    metadata: dict[str, Any] = Field(default_factory=dict)
    chunk_size: int | None = Field(None, ge=1, le=10_000)
    after: list[str] = Field(default_factory=list, max_length=16)

    @field_validator("after", mode="before")
    @classmethod
    def _after(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else (v or [])

    def payload_digest(self) -> str:
        """What the idempotency key protects: everything but the key itself."""
        body = self.model_dump(mode="json", exclude={"idempotency_key"}, by_alias=True)
        raw = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(raw.encode()).hexdigest()


def load_yaml(path: Path) -> Any:
    """A YAML (or JSON) file the user wrote, or a SpecError naming the file and the first problem."""
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise SpecError(f"{path}: {e.strerror}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise SpecError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None


def parse_spec(data: Any) -> JobSpec:
    """Validate raw JSON-like data into a JobSpec, or raise SpecError naming the field."""
    if not isinstance(data, dict):
        raise SpecError(f"a job spec must be a mapping, got {type(data).__name__}")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(format_validation_error(e)) from None


def format_validation_error(e: ValidationError, prefix: str = "") -> str:
    parts = []
    for err in e.errors()[:5]:
        loc = prefix + ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        parts.append(f"{loc}: {msg}" if loc else msg)
    more = len(e.errors()) - 5
    if more > 0:
        parts.append(f"... and {more} more")
    return "; ".join(parts)


def effective_params(kind: str, *layers: dict[str, Any], where: str = "params") -> BaseModel:
    """Merge parameter layers (model defaults, job, item) and validate the result."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(layer or {})
    schema = PARAMS_BY_KIND.get(kind)
    if schema is None:
        raise SpecError(f"kind {kind!r} has no generation backend yet")
    try:
        return schema.model_validate(merged)
    except ValidationError as e:
        raise SpecError(format_validation_error(e, prefix=f"{where}.")) from None


def check_limits(spec: JobSpec, limits: Limits, model_defaults: dict[str, Any]) -> None:
    """Everything that can be refused at submit is refused here, before any write."""
    n = len(spec.items)
    if n == 0:
        raise SpecError("items: a job needs at least one item")
    if n > limits.max_items_per_job:
        raise SpecError(f"items: {n} items is over the limit of {limits.max_items_per_job} per job")
    meta_bytes = len(json.dumps(spec.metadata, default=str).encode())
    if meta_bytes > limits.max_metadata_bytes:
        raise SpecError(f"metadata: {meta_bytes} bytes is over the limit of {limits.max_metadata_bytes}")
    job_params = effective_params(spec.kind, model_defaults, spec.params)  # errors name "params"
    seen: dict[str, int] = {}
    for i, item in enumerate(spec.items):
        cid = item.custom_id if item.custom_id is not None else str(i)
        if len(cid) > limits.max_custom_id_chars:
            raise SpecError(f"items[{i}].custom_id: longer than {limits.max_custom_id_chars} characters")
        if cid in seen:
            raise SpecError(f"items[{i}].custom_id: {cid!r} duplicates items[{seen[cid]}]")
        seen[cid] = i
        if item.text is not None and item.prompt:
            raise SpecError(f"items[{i}]: give text or prompt, not both")
        if item.source is not None and item.input_text:
            raise SpecError(f"items[{i}]: an item with 'from' takes its text from that job; give no prompt")
        if item.source is None and not item.input_text and spec.kind != "image":
            raise SpecError(f"items[{i}].prompt: a {spec.kind} item needs a prompt (or 'from')")
        size = len(item.input_text.encode())
        if size > limits.max_prompt_bytes:
            raise SpecError(f"items[{i}].prompt: {size} bytes is over the limit of {limits.max_prompt_bytes}")
        if spec.kind == "audio" and len(item.input_text) > limits.max_tts_chars:
            raise SpecError(f"items[{i}].text: {len(item.input_text)} characters is over the limit of "
                            f"{limits.max_tts_chars} for speech")
        p = job_params
        if item.params:
            p = effective_params(spec.kind, model_defaults, spec.params, item.params, where=f"items[{i}].params")
        _check_param_limits(spec.kind, p, limits, f"items[{i}].params" if item.params else "params")


def _check_param_limits(kind: str, p: BaseModel, limits: Limits, where: str) -> None:
    if kind == "text" and p.max_new_tokens > limits.max_new_tokens:
        raise SpecError(f"{where}.max_new_tokens: {p.max_new_tokens} is over the limit of {limits.max_new_tokens}")
    if kind == "image":
        if p.num_inference_steps is not None and p.num_inference_steps > limits.max_inference_steps:
            raise SpecError(f"{where}.num_inference_steps: {p.num_inference_steps} is over the limit of "
                            f"{limits.max_inference_steps}")
        pixels = (p.height or 0) * (p.width or 0)
        if pixels > limits.max_image_pixels:
            raise SpecError(f"{where}: {p.width}x{p.height} is {pixels} pixels, over the limit of "
                            f"{limits.max_image_pixels}")
