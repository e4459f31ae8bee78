"""Submitting fine-tuning jobs: validation, the dataset put into the object store, the job row."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from aigc_core.errors import NotFound, SpecError
from aigc_core.jobs import job_by_idempotency_key, record_event
from aigc_core.registry import check_model_name, resolve
from aigc_core.schema import Chunk, ChunkStatus, Item, ItemStatus, Job, JobStatus

DIGITS_DATASET = "builtin://sklearn-digits"
DIGITS_HP = {"max_steps": (int, 1, 200_000, 1000), "max_seconds": (float, 1, 86_400, 600.0),
             "seed": (int, 0, 2**32 - 1, 0), "eval_every": (int, 1, 100_000, 100)}


def digits_hyperparameters(hp: dict[str, Any]) -> dict[str, Any]:
    """Training options of the digits GAN / VAE, each checked against its range."""
    if unknown := sorted(set(hp) - set(DIGITS_HP)):
        raise SpecError(f"hyperparameters: unknown option(s) {unknown} for a digits model; "
                        f"allowed: {sorted(DIGITS_HP)}")
    out = {}
    for key, (kind, lo, hi, default) in DIGITS_HP.items():
        v = hp.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)) \
                or not lo <= v <= hi:
            raise SpecError(f"hyperparameters: {key} must be {'an integer' if kind is int else 'a number'} "
                            f"in [{lo}, {hi}], got {v!r}")
        out[key] = kind(v)
    return out


def submit_finetune(client, base_model: str, dataset: str | Path, output_model: str,
                    hyperparameters: dict[str, Any], idempotency_key: str | None,
                    metadata: dict[str, Any]) -> str:
    """Validate a fine-tuning request and write its job (one item, one chunk on the ``train`` queue);
    returns the job id. A text dataset is checked line by line, an image dataset image by image, and a
    local one is put into the object store."""
    try:
        check_model_name(output_model)
    except SpecError as e:
        raise SpecError(f"output_model: {e}") from None
    if idempotency_key:  # a repeated submit returns its job before the dataset is read again
        with client.db.session() as s:
            row = s.execute(select(Job.id, Job.kind).where(Job.idempotency_key == idempotency_key)).first()
        if row is not None and row.kind == "finetune":
            return row.id
    base = client.model(base_model)
    if base.backend == "digits":  # the project's GAN / VAE: a new model of the base's kind
        hp = digits_hyperparameters(hyperparameters or {})
        if str(dataset) != DIGITS_DATASET:
            raise SpecError(f"dataset: digits models train on {DIGITS_DATASET} (scikit-learn's digits)")
        params = {"trainer": "digits", "dataset": DIGITS_DATASET, "dataset_sha256": None,
                  "output_model": output_model, "hyperparameters": hp}
        seed = hp["seed"]
    elif base.kind == "text":
        from aigc_models.finetune import FinetuneConfig  # torch-free: the config and dataset format

        try:
            cfg = FinetuneConfig.from_dict(hyperparameters or {})
        except (TypeError, ValueError) as e:
            raise SpecError(f"hyperparameters: {e}") from None
        uri, sha, stats = _stage_dataset(client, str(dataset))
        params = {"trainer": "causal-lm", "dataset": uri, "dataset_sha256": sha, "output_model": output_model,
                  "hyperparameters": cfg.to_dict(), "dataset_stats": stats}
        seed = cfg.seed
    elif base.kind == "image" and base.backend == "diffusers":
        from scheduler.image_training import image_finetune_params

        params, seed = image_finetune_params(client, base, str(dataset), output_model, hyperparameters)
    elif base.kind == "audio" and base.backend == "hf-tts":
        from scheduler.speech_training import speech_finetune_params

        params, seed = speech_finetune_params(client, base, str(dataset), output_model, hyperparameters)
    else:
        raise SpecError(f"base model {base.tag} ({base.backend}): fine-tuning takes text models, diffusers "
                        "image pipelines, SpeechT5 voices and the digits GAN / VAE")
    return _insert_finetune(client, base.tag, params, seed, idempotency_key, metadata or {})

def _stage_dataset(client, dataset: str) -> tuple[str, str, dict[str, int]]:
    """Validate the dataset (errors name the line) and put a local one into the object store."""
    import tempfile

    from aigc_core.storage import download_uri
    from aigc_models.finetune import DatasetError, dataset_digest, validate_dataset

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(dataset.removeprefix("file://")) if "://" not in dataset or dataset.startswith("file://") \
            else None
        path = local or Path(tmp) / ("dataset" + Path(dataset).suffix)
        if local is None:
            try:
                download_uri(dataset, path, endpoint_url=client.settings.s3_endpoint_url)
            except NotFound:
                raise SpecError(f"dataset {dataset} does not exist") from None
        try:
            stats = validate_dataset(path)
        except DatasetError as e:
            raise SpecError(f"dataset: {e}") from None
        sha = dataset_digest(path)
        if local is None:
            return dataset, sha, stats
        key = f"datasets/{sha.removeprefix('sha256:')}{path.suffix}"
        if not client.store.exists(key):
            client.store.upload(key, path)
        return client.store.uri(key), sha, stats

def _insert_finetune(client, base_model: str, params: dict[str, Any], seed: int, key: str | None,
                     metadata: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps([base_model, params, metadata], sort_keys=True).encode()).hexdigest()
    try:
        return _write_finetune(client, base_model, params, seed, key, metadata, digest)
    except IntegrityError:
        if not key:
            raise
        with client.db.session() as s:  # a concurrent submit with the same key won the insert
            existing = job_by_idempotency_key(s, key, digest)
        if existing:
            return existing
        raise

def _write_finetune(client, base_model: str, params: dict[str, Any], seed: int, key: str | None,
                    metadata: dict[str, Any], digest: str) -> str:
    with client.db.session() as s:
        existing = job_by_idempotency_key(s, key, digest)
        if existing:
            return existing
        base = resolve(s, base_model)
        job = Job(kind="finetune", model_name=base.name, model_version=base.version, queue="train",
                  status=JobStatus.queued, params=params, seed=seed, meta=metadata, idempotency_key=key,
                  payload_digest=digest, item_count=1, chunk_size=1, depends_on=[])
        s.add(job)
        s.flush()
        s.add(Item(job_id=job.id, index=0, chunk_no=0, custom_id="model", prompt="", params={}, seed=seed,
                   status=ItemStatus.pending, attempts=0))
        s.add(Chunk(job_id=job.id, chunk_no=0, status=ChunkStatus.pending, publish_count=0))
        record_event(s, job.id, "submitted", base_model=base.tag, output_model=params["output_model"],
                     dataset=params["dataset"])
        return job.id
