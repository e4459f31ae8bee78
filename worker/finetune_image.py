"""Image and speech fine-tuning runs (text-to-image LoRA, unconditional UNets, SpeechT5): the dataset
folder fetched and checked against its digest, training resumable from the store's checkpoints, the
result registered, the validation samples (before and after, same seeds) stored beside the job."""

from __future__ import annotations

import mimetypes
import time
from pathlib import Path
from typing import Any

from aigc_core.jobs import job_prefix, record_event
from aigc_core.registry import materialize
from aigc_core.storage import download_prefix
from worker.finetune import _fetch_latest_checkpoint, _finish, _upload_checkpoint, _Watch
from worker.runtime import Runtime
from worker.store import cancel_rest, fail

IMAGE_TRAINERS = ("text-to-image", "unconditional-image", "speecht5")  # media trainers run here


def run_image_finetune(rt: Runtime, job, token: str, item, res, work: Path, watch: _Watch) -> None:
    from aigc_models.image_data import image_dataset_digest, image_dataset_files, read_records

    p = job.params
    base_dir = materialize(job.model, rt.settings.cache_dir, endpoint_url=rt.settings.s3_endpoint_url)
    watch.heartbeat()
    data = work / "dataset"
    download_prefix(p["dataset"], data, endpoint_url=rt.settings.s3_endpoint_url)
    watch.heartbeat()
    if p["trainer"] == "speecht5":
        from aigc_models.speech_data import AUDIO_SUFFIXES, SpeechFinetuneConfig
        from aigc_models.speech_finetune import finetune_speecht5

        records = read_records(data, captions=True, suffixes=AUDIO_SUFFIXES)
        cfg: Any = SpeechFinetuneConfig.from_dict(p["hyperparameters"])
        train: Any = finetune_speecht5
    else:
        from aigc_models.image_data import ImageFinetuneConfig
        from aigc_models.image_finetune import finetune_diffusion

        records = read_records(data, captions=p["trainer"] == "text-to-image")
        cfg, train = ImageFinetuneConfig.from_dict(p["hyperparameters"]), finetune_diffusion
    if image_dataset_digest(data, image_dataset_files(data, records)) != p["dataset_sha256"]:
        fail(rt, token, {item.id: f"dataset {p['dataset']} changed since the job was submitted"})
        res.failed += 1
        return
    resume = _fetch_latest_checkpoint(rt, job.id, work / "resume")
    if resume:
        with rt.db.session() as s:
            record_event(s, job.id, "resumed", checkpoint=resume.name, worker=rt.worker_id)
    watch.heartbeat()
    t0 = time.perf_counter()
    metrics = train(
        base_dir, data, records, work / "out", cfg, resume_from=resume, on_event=watch.event,
        on_checkpoint=lambda d, state: _upload_checkpoint(rt, job.id, d, watch), should_stop=watch.cancelled,
        checkpoint_dir=work / "checkpoints", validation_dir=work / "validation", device=rt.device,
    )
    if metrics.get("interrupted"):
        if not watch.lost:  # lost: another delivery holds the item now and resumes from our checkpoint
            res.cancelled += cancel_rest(rt, token)
        return
    # Validation images beside the job's outputs, at fixed keys: a re-run overwrites them.
    names = metrics.pop("validation_images", []) + metrics.pop("validation_audio", [])
    prefix = f"{job_prefix(job.id)}/validation"
    uris = [rt.store.upload(f"{prefix}/{n}", work / "validation" / n,
                            mimetypes.guess_type(n)[0] or "application/octet-stream").uri for n in names]
    watch.heartbeat()
    _finish(rt, job, token, item, res, work, metrics, time.perf_counter() - t0, card_extra={"validation": uris})
