"""Speech fine-tuning datasets and options, without torch: (audio, text) pairs in the imagefolder
layout (``metadata.jsonl`` of ``{"file_name": "clip.wav", "text": ...}``), checked at submit."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from aigc_models.finetune import DatasetError
from aigc_models.image_data import MAX_CAPTION_CHARS, MAX_DATASET_BYTES, ImageRecord, checked_option, numbered_records

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
MAX_CLIP_BYTES = 64 << 20
MIN_CLIP_SECONDS, MAX_CLIP_SECONDS = 0.1, 30.0


def validate_speech_dataset(root: Path) -> tuple[list[ImageRecord], dict[str, Any]]:
    """Every clip present, within limits and decodable, every line captioned; errors name the line."""
    import soundfile as sf

    root = Path(root)
    records, total, seconds = [], 0, 0.0
    for rec, no in numbered_records(root, True, AUDIO_SUFFIXES):
        where = f"metadata.jsonl line {no}: {rec.file_name}"
        path = root / rec.file_name
        if not path.is_file():
            raise DatasetError(f"{where}: no such file in the dataset")
        size = path.stat().st_size
        if size > MAX_CLIP_BYTES:
            raise DatasetError(f"{where}: {size} bytes; a clip may have at most {MAX_CLIP_BYTES >> 20} MiB")
        total += size
        if total > MAX_DATASET_BYTES:
            raise DatasetError(f"{where}: the dataset passes {MAX_DATASET_BYTES >> 30} GiB")
        try:
            info = sf.info(str(path))
            sf.read(str(path), dtype="float32")  # decodes it: a truncated file fails here, not mid-training
        except Exception as e:  # libsndfile's errors come in several types
            raise DatasetError(f"{where}: not a readable audio file ({type(e).__name__}: {e})") from None
        if not MIN_CLIP_SECONDS <= info.duration <= MAX_CLIP_SECONDS:
            raise DatasetError(f"{where}: {info.duration:.2f} s; a clip must last {MIN_CLIP_SECONDS}-"
                               f"{MAX_CLIP_SECONDS:g} s")
        seconds += info.duration
        records.append(rec)
    return records, {"clips": len(records), "seconds": round(seconds, 2), "bytes": total}


_RULES: dict[str, tuple[type, float, float, bool]] = {
    "max_steps": (int, 1, 1_000_000, False),
    "max_seconds": (float, 1, 30 * 86400, True),
    "learning_rate": (float, 1e-8, 1, False),
    "batch_size": (int, 1, 256, False),
    "seed": (int, 0, 2**32 - 1, False),
    "eval_every": (int, 1, 1_000_000, False),
    "checkpoint_every": (int, 0, 1_000_000, False),
    "keep_checkpoints": (int, 0, 1000, False),
    "max_grad_norm": (float, 0, 1e6, False),
    "speaker_id": (int, 0, 100_000, False),
    "train_encoder": (bool, 0, 1, False),
}
MAX_VALIDATION_TEXTS = 8


@dataclass(frozen=True)
class SpeechFinetuneConfig:
    """Options of one SpeechT5 fine-tuning run."""

    max_steps: int = 1000
    max_seconds: float | None = 3600.0
    learning_rate: float = 1e-5  # Hugging Face's SpeechT5 guide; a tiny model wants far more
    batch_size: int = 4
    seed: int = 0
    eval_every: int = 50  # steps between events (mean training loss, fixed evaluation loss)
    checkpoint_every: int = 200  # 0: only when asked to stop
    keep_checkpoints: int = 2
    max_grad_norm: float = 1.0
    speaker_id: int = 0  # the row of the checkpoint's speaker x-vectors the new voice is trained on
    train_encoder: bool = False  # False: the text encoder stays as it was; the decoder learns the voice
    validation_texts: tuple[str, ...] = ()  # spoken before and after, same seed

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name != "validation_texts":
                object.__setattr__(self, f.name, checked_option(f.name, getattr(self, f.name), _RULES))
        texts = self.validation_texts
        texts = (texts,) if isinstance(texts, str) else texts
        if not isinstance(texts, list | tuple) or len(texts) > MAX_VALIDATION_TEXTS or not all(
                isinstance(t, str) and t.strip() and len(t) <= MAX_CAPTION_CHARS for t in texts):
            raise ValueError(f"validation_texts must be a text or a list of at most {MAX_VALIDATION_TEXTS} "
                             f"non-empty texts, got {texts!r}")
        object.__setattr__(self, "validation_texts", tuple(texts))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SpeechFinetuneConfig:
        if not isinstance(d, Mapping):
            raise ValueError(f"fine-tuning options must be a mapping, got {type(d).__name__}")
        allowed = sorted([*_RULES, "validation_texts"])
        if unknown := sorted(set(d) - set(allowed)):
            raise ValueError(f"unknown speech fine-tuning option(s) {unknown}; allowed: {allowed}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["validation_texts"] = list(self.validation_texts)
        return d
