"""The job spec: what a user submits, validated before anything is written."""

from __future__ import annotations

import hashlib
import json
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


PARAMS_BY_KIND: dict[str, type[BaseModel]] = {"text": TextParams}


class ItemSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    custom_id: str | None = None
    prompt: str
    params: dict[str, Any] = Field(default_factory=dict)

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

    def payload_digest(self) -> str:
        """What the idempotency key protects: everything but the key itself."""
        body = self.model_dump(mode="json", exclude={"idempotency_key"})
        raw = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(raw.encode()).hexdigest()


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
        size = len(item.prompt.encode())
        if size > limits.max_prompt_bytes:
            raise SpecError(f"items[{i}].prompt: {size} bytes is over the limit of {limits.max_prompt_bytes}")
        p = job_params
        if item.params:
            p = effective_params(spec.kind, model_defaults, spec.params, item.params, where=f"items[{i}].params")
        if spec.kind == "text" and p.max_new_tokens > limits.max_new_tokens:
            raise SpecError(
                f"items[{i}].params.max_new_tokens: {p.max_new_tokens} is over the limit of {limits.max_new_tokens}"
            )
