"""Image fine-tuning datasets and options, without torch: the submit side validates with them.

A dataset is a folder (or an object-store prefix fetched into one) in the layout ``datasets``'
imagefolder reads: image files and a ``metadata.jsonl`` with one ``{"file_name": ..., "text": ...}``
a line. An unconditional model may train on a folder of images without one.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path, PurePosixPath
from typing import Any

from aigc_models.finetune import DatasetError

METADATA = "metadata.jsonl"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_IMAGES = 20_000
MAX_IMAGE_BYTES = 32 << 20
MAX_IMAGE_PIXELS = 40_000_000  # decoding a larger one is refused before it is decoded (a decompression bomb)
MIN_IMAGE_SIDE = 8
MAX_DATASET_BYTES = 8 << 30
MAX_CAPTION_CHARS = 2000
MAX_METADATA_BYTES = 64 << 20


@dataclass(frozen=True)
class ImageRecord:
    file_name: str  # relative POSIX path inside the dataset folder
    text: str | None


def read_records(root: Path, *, captions: bool, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[ImageRecord]:
    """The dataset's records: ``metadata.jsonl`` line by line (errors name the line), or, where
    captions are not needed and there is no metadata, every image file under ``root``, sorted.
    ``suffixes``: the media files a record may name (audio datasets use the same layout)."""
    return [r for r, _ in numbered_records(Path(root), captions, suffixes)]


def numbered_records(root: Path, captions: bool, suffixes: tuple[str, ...] = IMAGE_SUFFIXES
                     ) -> list[tuple[ImageRecord, int]]:
    """Records with their metadata line number (0 for a folder without metadata)."""
    if not root.is_dir():
        raise DatasetError(f"dataset {root} is not a folder")
    meta = root / METADATA
    if not meta.is_file():
        if captions:
            raise DatasetError(f"dataset {root.name}: no {METADATA}; a text-to-image dataset needs one "
                               '{"file_name": ..., "text": ...} a line beside the images')
        names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                       if p.is_file() and p.suffix.lower() in suffixes)
        records = [(ImageRecord(n, None), 0) for n in names]
    else:
        if meta.stat().st_size > MAX_METADATA_BYTES:
            raise DatasetError(f"{METADATA} is larger than {MAX_METADATA_BYTES >> 20} MiB")
        records = list(_metadata_records(meta, captions, suffixes))
    if not records:
        raise DatasetError(f"dataset {root.name} holds no {'images' if suffixes == IMAGE_SUFFIXES else 'files'}")
    if len(records) > MAX_IMAGES:
        raise DatasetError(f"dataset {root.name} holds {len(records)} files; at most {MAX_IMAGES}")
    return records


def _metadata_records(meta: Path, captions: bool, suffixes: tuple[str, ...]):
    for no, raw in enumerate(meta.read_bytes().splitlines(), 1):
        where = f"{METADATA} line {no}"
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8-sig" if no == 1 else "utf-8"))
        except UnicodeDecodeError:
            raise DatasetError(f"{where}: not valid UTF-8") from None
        except json.JSONDecodeError as e:
            raise DatasetError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DatasetError(f'{where}: expected an object like {{"file_name": ..., "text": ...}}')
        name = obj.get("file_name")
        if not isinstance(name, str) or not name:
            raise DatasetError(f'{where}: "file_name" must be a non-empty string')
        p = PurePosixPath(name)
        if p.is_absolute() or ".." in p.parts or "\\" in name or p.suffix.lower() not in suffixes:
            raise DatasetError(f"{where}: file_name {name!r} must be a relative path to a "
                               f"{'/'.join(s[1:] for s in suffixes)} file inside the dataset folder")
        text = obj.get("text")
        if captions or text is not None:
            if not isinstance(text, str) or not text.strip():
                raise DatasetError(f'{where}: "text" must be a non-empty string (the image\'s caption)')
            if len(text) > MAX_CAPTION_CHARS:
                raise DatasetError(f'{where}: "text" is longer than {MAX_CAPTION_CHARS} characters')
        yield ImageRecord(p.as_posix(), text), no


def validate_image_dataset(root: Path, *, captions: bool) -> tuple[list[ImageRecord], dict[str, Any]]:
    """Check every record's image (present, within limits, decodable) and return the records with
    the dataset's statistics. Errors name the metadata line, or the file where there is no metadata."""
    from PIL import Image

    root = Path(root)
    records, total = [], 0
    for rec, no in numbered_records(root, captions):
        where = f"{METADATA} line {no}: {rec.file_name}" if no else rec.file_name
        path = root / rec.file_name
        if not path.is_file():
            raise DatasetError(f"{where}: no such file in the dataset")
        size = path.stat().st_size
        if size > MAX_IMAGE_BYTES:
            raise DatasetError(f"{where}: {size} bytes; an image may have at most {MAX_IMAGE_BYTES} bytes")
        total += size
        if total > MAX_DATASET_BYTES:
            raise DatasetError(f"{where}: the dataset passes {MAX_DATASET_BYTES >> 30} GiB")
        try:
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise DatasetError(f"{where}: {w}x{h} pixels; at most {MAX_IMAGE_PIXELS} in one image")
                im.load()  # decodes it: a truncated or corrupt file fails here, not mid-training
        except DatasetError:
            raise
        except Exception as e:  # PIL raises many types for bad files
            raise DatasetError(f"{where}: not a readable image ({type(e).__name__}: {e})") from None
        if min(w, h) < MIN_IMAGE_SIDE:
            raise DatasetError(f"{where}: {w}x{h}; each side needs at least {MIN_IMAGE_SIDE} pixels")
        records.append(rec)
    stats = {"images": len(records), "bytes": total, "captioned": sum(r.text is not None for r in records)}
    return records, stats


def image_dataset_files(root: Path, records: list[ImageRecord]) -> list[str]:
    """The files that make the dataset: its metadata (if any) and each image once, sorted."""
    names = {r.file_name for r in records}
    if (Path(root) / METADATA).is_file():
        names.add(METADATA)
    return sorted(names)


def image_dataset_digest(root: Path, files: list[str]) -> str:
    """``sha256:`` over each file's relative name and content hash, as a model directory's digest."""
    h = hashlib.sha256()
    for name in sorted(files):
        f = hashlib.sha256()
        with (Path(root) / name).open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                f.update(block)
        h.update(name.encode() + b"\0" + f.hexdigest().encode() + b"\n")
    return "sha256:" + h.hexdigest()


# ---- options --------------------------------------------------------------------------------------

# key: (type, low, high, None allowed); both ends included.
_RULES: dict[str, tuple[type, float, float, bool]] = {
    "resolution": (int, 8, 2048, True),
    "max_steps": (int, 1, 1_000_000, False),
    "max_seconds": (float, 1, 30 * 86400, True),
    "learning_rate": (float, 1e-8, 1, False),
    "batch_size": (int, 1, 256, False),
    "lora": (bool, 0, 1, False),
    "rank": (int, 1, 256, False),
    "lora_alpha": (int, 1, 1024, True),
    "seed": (int, 0, 2**32 - 1, False),
    "eval_every": (int, 1, 1_000_000, False),
    "checkpoint_every": (int, 0, 1_000_000, False),
    "keep_checkpoints": (int, 0, 1000, False),
    "max_grad_norm": (float, 0, 1e6, False),
    "center_crop": (bool, 0, 1, False),
    "random_flip": (bool, 0, 1, False),
    "validation_steps": (int, 1, 200, False),
    "validation_images": (int, 0, 16, False),
}
MAX_VALIDATION_PROMPTS = 8


@dataclass(frozen=True)
class ImageFinetuneConfig:
    """Options of one diffusion fine-tuning run (text-to-image LoRA, or an unconditional UNet)."""

    resolution: int | None = None  # training side in pixels; None: the model's own (UNet sample size x VAE factor)
    max_steps: int = 500
    max_seconds: float | None = 3600.0
    learning_rate: float = 1e-4
    batch_size: int = 4
    lora: bool = True  # text-to-image: LoRA on the UNet's attention; false trains the whole UNet
    rank: int = 4
    lora_alpha: int | None = None  # None: equal to rank (scale 1), as diffusers' LoRA script does
    seed: int = 0
    eval_every: int = 50  # steps between events (mean training loss, fixed-noise eval loss)
    checkpoint_every: int = 100  # 0: only when asked to stop
    keep_checkpoints: int = 2
    max_grad_norm: float = 1.0
    center_crop: bool = True  # False: the crop's corner is drawn per step
    random_flip: bool = False
    validation_prompts: tuple[str, ...] = ()  # text-to-image: images made before and after, same seed
    validation_images: int = 0  # unconditional: samples made before and after, same seeds
    validation_steps: int = 25  # denoising steps for the validation images

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name != "validation_prompts":
                object.__setattr__(self, f.name, checked_option(f.name, getattr(self, f.name)))
        prompts = self.validation_prompts
        prompts = (prompts,) if isinstance(prompts, str) else prompts
        if not isinstance(prompts, list | tuple) or len(prompts) > MAX_VALIDATION_PROMPTS or not all(
                isinstance(p, str) and p.strip() and len(p) <= MAX_CAPTION_CHARS for p in prompts):
            raise ValueError(f"validation_prompts must be a prompt or a list of at most {MAX_VALIDATION_PROMPTS} "
                             f"non-empty prompts, got {prompts!r}")
        object.__setattr__(self, "validation_prompts", tuple(prompts))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ImageFinetuneConfig:
        if not isinstance(d, Mapping):
            raise ValueError(f"fine-tuning options must be a mapping, got {type(d).__name__}")
        allowed = sorted([*_RULES, "validation_prompts"])
        if unknown := sorted(set(d) - set(allowed)):
            raise ValueError(f"unknown image fine-tuning option(s) {unknown}; allowed: {allowed}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["validation_prompts"] = list(self.validation_prompts)
        return d


def checked_option(key: str, value: Any, rules: dict[str, tuple[type, float, float, bool]] | None = None) -> Any:
    """``value`` checked against its rule (type, low, high, None allowed); a ValueError says the range."""
    kind, lo, hi, nullable = (rules or _RULES)[key]
    if value is None and nullable:
        return None
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (kind is int and not isinstance(value, int)) or not lo <= value <= hi:
        what = "an integer" if kind is int else "a number"
        raise ValueError(f"{key} must be {what} in [{lo:g}, {hi:g}]{' or null' if nullable else ''}, got {value!r}")
    return kind(value)
