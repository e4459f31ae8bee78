"""Submitting image fine-tuning: the trainer the base pipeline needs, its options, the dataset folder
validated (errors name the metadata line) and, when local, put into the object store."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from aigc_core.errors import NotFound, SpecError, StorageError
from aigc_core.registry import ModelRef, local_path

# model_index.json's UNet class -> the trainer; anything else (SDXL, Flux, ...) is refused at submit.
UNET_TRAINERS = {"UNet2DConditionModel": "text-to-image", "UNet2DModel": "unconditional-image"}


def image_finetune_params(client, base: ModelRef, dataset: str, output_model: str,
                          hyperparameters: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """The job's params and seed for fine-tuning the diffusers pipeline ``base`` on ``dataset``."""
    from aigc_models.image_data import ImageFinetuneConfig

    trainer = _trainer(client, base)
    hp = dict(hyperparameters or {})
    if trainer == "unconditional-image":
        if hp.get("lora"):
            raise SpecError("hyperparameters: lora: an unconditional UNet is fine-tuned whole (lora: false)")
        if hp.get("validation_prompts"):
            raise SpecError("hyperparameters: validation_prompts: an unconditional model takes no prompt; "
                            "set validation_images (a number of samples) instead")
        hp["lora"] = False
    elif hp.get("validation_images"):
        raise SpecError("hyperparameters: validation_images is for unconditional models; a text-to-image "
                        "model draws validation_prompts")
    try:
        cfg = ImageFinetuneConfig.from_dict(hp)
    except (TypeError, ValueError) as e:
        raise SpecError(f"hyperparameters: {e}") from None
    from aigc_models.image_data import validate_image_dataset

    captions = trainer == "text-to-image"
    uri, sha, stats = stage_media_dataset(client, dataset, lambda root: validate_image_dataset(root, captions=captions))
    params = {"trainer": trainer, "dataset": uri, "dataset_sha256": sha, "output_model": output_model,
              "hyperparameters": cfg.to_dict(), "dataset_stats": stats}
    return params, cfg.seed


def _trainer(client, base: ModelRef) -> str:
    """Read the base pipeline's model_index.json (a local file, or one object of an s3:// model)."""
    raw = None
    try:
        if base.uri.startswith("file://"):
            f = local_path(base.uri) / "model_index.json"
            raw = f.read_bytes() if f.is_file() else None
        elif base.uri.startswith("s3://"):
            from aigc_core.storage import S3Store

            parsed = urlparse(base.uri)
            raw = S3Store(parsed.netloc, parsed.path.strip("/"), endpoint_url=client.settings.s3_endpoint_url
                          ).get("model_index.json")
    except NotFound:
        raw = None
    except StorageError as e:
        raise SpecError(f"base model {base.tag}: cannot read its model_index.json: {e}") from None
    try:
        index = json.loads(raw) if raw is not None else None
    except ValueError:
        index = None
    if not isinstance(index, dict):
        raise SpecError(f"base model {base.tag}: no readable model_index.json at {base.uri}: image fine-tuning "
                        "takes a diffusers pipeline directory")
    unet = index.get("unet")
    cls = unet[1] if isinstance(unet, list) and len(unet) == 2 else None
    trainer = UNET_TRAINERS.get(str(cls))
    conditional_parts = all(index.get(k) for k in ("vae", "text_encoder", "tokenizer"))
    if trainer == "text-to-image" and not conditional_parts:
        trainer = None
    if trainer == "unconditional-image" and (index.get("vae") or index.get("vqvae")):
        trainer = None
    if trainer is None:
        raise SpecError(f"base model {base.tag} is a {index.get('_class_name')} with a {cls} UNet: image "
                        "fine-tuning takes Stable-Diffusion-style pipelines (UNet2DConditionModel, VAE, text "
                        "encoder) and unconditional UNet2DModel pipelines (DDPM, DDIM)")
    return trainer


def stage_media_dataset(client, dataset: str, validate: Callable[[Path], tuple[list, dict[str, Any]]]
                        ) -> tuple[str, str, dict[str, Any]]:
    """Validate the folder (or s3:// prefix) with ``validate`` and return its URI, digest and statistics;
    a local folder's dataset files are copied into the store under ``datasets/<digest>/``."""
    from aigc_core.storage import download_prefix
    from aigc_models.finetune import DatasetError
    from aigc_models.image_data import MAX_DATASET_BYTES, image_dataset_digest, image_dataset_files

    remote = dataset.startswith("s3://")
    with tempfile.TemporaryDirectory() as tmp:
        if remote:
            root = Path(tmp) / "dataset"
            try:
                download_prefix(dataset, root, endpoint_url=client.settings.s3_endpoint_url,
                                max_bytes=MAX_DATASET_BYTES + (64 << 20))
            except NotFound:
                raise SpecError(f"dataset {dataset}: nothing under that prefix") from None
        else:
            root = Path(dataset.removeprefix("file://")).expanduser()
            if not root.is_dir():
                raise SpecError(f"dataset {dataset}: no such folder (an image or speech dataset is a folder of "
                                "files with a metadata.jsonl, or an s3:// prefix holding one)")
        try:
            records, stats = validate(root)
        except DatasetError as e:
            raise SpecError(f"dataset: {e}") from None
        files = image_dataset_files(root, records)
        sha = image_dataset_digest(root, files)
        if remote:
            return dataset.rstrip("/") + "/", sha, stats
        prefix = f"datasets/{sha.removeprefix('sha256:')}"
        for name in files:  # content-addressed: a file already there is the same file
            if not client.store.exists(f"{prefix}/{name}"):
                client.store.upload(f"{prefix}/{name}", root / name)
        return client.store.uri(prefix) + "/", sha, stats
