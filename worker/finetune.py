"""Fine-tuning jobs: one item whose work is a training run, resumable from checkpoints in object storage."""

from __future__ import annotations

import json
import shutil
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from aigc_core import __version__
from aigc_core.jobs import _rowcount, job_prefix, record_event
from aigc_core.registry import ModelRef, dir_digest, materialize, register, safe_join
from aigc_core.schema import Item, ItemStatus, Job, JobStatus, Model, utcnow
from aigc_core.storage import download_uri
from aigc_models import Output
from worker.provenance import library_versions
from worker.runtime import Runtime
from worker.store import cancel_rest, fail, store_and_commit

DONE_MARKER = "checkpoint.complete"  # written last: a checkpoint without it was cut off mid-upload


def run_finetune(rt: Runtime, job, token: str, item, res) -> None:
    """Train, checkpoint to the store as it goes, register the model with its lineage, commit the card."""
    from aigc_models.finetune import FinetuneConfig, dataset_digest, finetune_causal_lm, load_dataset_texts

    p = job.params
    work = rt.settings.cache_dir / "finetune" / job.id
    watch = _Watch(rt, job.id, token)
    if p.get("trainer") == "digits":
        return _run_digits(rt, job, token, item, res, work, watch)
    from worker.finetune_image import IMAGE_TRAINERS, run_image_finetune

    if p.get("trainer") in IMAGE_TRAINERS:
        return run_image_finetune(rt, job, token, item, res, work, watch)
    base_dir = materialize(job.model, rt.settings.cache_dir, endpoint_url=rt.settings.s3_endpoint_url)
    watch.heartbeat()
    data = work / ("dataset" + Path(p["dataset"]).suffix)
    download_uri(p["dataset"], data, endpoint_url=rt.settings.s3_endpoint_url)
    watch.heartbeat()
    if dataset_digest(data) != p["dataset_sha256"]:
        fail(rt, token, {item.id: f"dataset {p['dataset']} changed since the job was submitted"})
        res.failed += 1
        return
    cfg = FinetuneConfig.from_dict(p["hyperparameters"])
    resume = _fetch_latest_checkpoint(rt, job.id, work / "resume")
    if resume:
        with rt.db.session() as s:
            record_event(s, job.id, "resumed", checkpoint=resume.name, worker=rt.worker_id)
    watch.heartbeat()
    t0 = time.perf_counter()
    metrics = finetune_causal_lm(
        base_dir, load_dataset_texts(data), work / "out", cfg, resume_from=resume, on_event=watch.event,
        on_checkpoint=lambda d, state: _upload_checkpoint(rt, job.id, d, watch), should_stop=watch.cancelled,
        checkpoint_dir=work / "checkpoints", device=rt.device,
    )
    if metrics.get("interrupted"):
        if watch.lost:  # another delivery holds the item now; it resumes from our checkpoint
            return

        res.cancelled += cancel_rest(rt, token)
        return
    _finish(rt, job, token, item, res, work, metrics, time.perf_counter() - t0)


def _finish(rt: Runtime, job, token: str, item, res, work: Path, metrics: dict[str, Any], seconds: float,
            dataset_sha256: str | None = None, card_extra: dict[str, Any] | None = None) -> None:
    """Register the trained model, then commit its model card as the item's output."""

    ref = _register_once(rt, job, work / "out", metrics, dataset_sha256)
    card = {"model": ref.tag, "uri": ref.uri, "digest": ref.digest,
            "lineage": _lineage(job, metrics, ref.digest, dataset_sha256), **(card_extra or {})}
    out = Output(json.dumps(card, indent=1, sort_keys=True).encode(), "application/json", "json",
                 {"registered": ref.tag})
    store_and_commit(rt, job, token, [item], [(out, None, seconds)], _Card(job.model), res)
    shutil.rmtree(work, ignore_errors=True)


def _run_digits(rt: Runtime, job, token: str, item, res, work: Path, watch: _Watch) -> None:
    """The project's GAN / VAE: a new model of the base's kind trained on scikit-learn's digits."""
    import hashlib

    from aigc_models.digits import digits_data, train_digits
    from aigc_models.image import DigitsGenerator  # the "digits" backend

    hp = job.params["hyperparameters"]
    base = DigitsGenerator.load(materialize(job.model, rt.settings.cache_dir), device="cpu")
    kind = base.config["kind"]
    t0 = time.perf_counter()

    def on_step(step: int, losses: dict[str, float]) -> bool:
        if step % hp["eval_every"] == 0:
            watch.event({"step": step, "total_steps": hp["max_steps"], "kind": kind,
                         "loss": sum(losses.values()), **{k: round(v, 5) for k, v in losses.items()}})
        return watch.cancelled() or time.perf_counter() - t0 > hp["max_seconds"]

    metrics = train_digits(kind, work / "out", seed=hp["seed"], on_step=on_step, max_steps=hp["max_steps"])
    if watch.lost:
        return
    if watch.cancelled():

        res.cancelled += cancel_rest(rt, token)
        return
    x, y = digits_data()
    sha = "sha256:" + hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()
    _finish(rt, job, token, item, res, work, metrics, time.perf_counter() - t0, sha)


class _Watch:
    """Progress events, the lease heartbeat and the cancellation check, all from the training loop."""

    def __init__(self, rt: Runtime, job_id: str, token: str):
        self.rt, self.job_id, self.token = rt, job_id, token
        self._checked = 0.0
        self._cancel = False
        self.lost = False

    def event(self, e: dict[str, Any]) -> None:
        with self.rt.db.session() as s:
            record_event(s, self.job_id, "train", **e)
        self.heartbeat()

    def heartbeat(self) -> None:
        """Renew the lease; a run that lost it (another worker took over) stops at the next step."""
        with self.rt.db.session() as s:
            kept = _rowcount(s.execute(
                update(Item).where(Item.claim_token == self.token, Item.status == ItemStatus.running)
                .values(lease_until=utcnow() + timedelta(seconds=self.rt.settings.lease_s))
                .execution_options(synchronize_session=False)))
        self.lost = not kept

    def cancelled(self) -> bool:
        """Called before every step: asks the database at most every few seconds, and renews the lease
        on a timer, so a long evaluation interval never lets it expire."""
        now = time.monotonic()
        if now - self._checked > min(2.0, self.rt.settings.lease_s / 4):
            self._checked = now
            with self.rt.db.session() as s:
                self._cancel = s.scalar(select(Job.status).where(Job.id == self.job_id)) == JobStatus.cancelled
            self.heartbeat()
        return self._cancel or self.lost


def _ckpt_prefix(job_id: str) -> str:
    return f"{job_prefix(job_id)}/checkpoints"


def _upload_checkpoint(rt: Runtime, job_id: str, path: Path, watch: _Watch) -> None:
    prefix = f"{_ckpt_prefix(job_id)}/{path.name}"
    for f in sorted(q for q in path.rglob("*") if q.is_file()):
        rt.store.upload(f"{prefix}/{f.relative_to(path).as_posix()}", f)
    rt.store.put(f"{prefix}/{DONE_MARKER}", b"")
    with rt.db.session() as s:
        record_event(s, job_id, "checkpoint", name=path.name, key=prefix)
    watch.heartbeat()


def _fetch_latest_checkpoint(rt: Runtime, job_id: str, dest: Path) -> Path | None:
    """The newest complete checkpoint this job left in the store (a restarted run resumes from it)."""
    prefix = _ckpt_prefix(job_id) + "/"
    keys = list(rt.store.list(prefix))
    done = sorted({k[len(prefix):].split("/")[0] for k in keys if k.endswith("/" + DONE_MARKER)})
    if not done:
        return None
    name = done[-1]
    shutil.rmtree(dest, ignore_errors=True)
    for k in keys:
        rel = k[len(prefix):]
        if rel.startswith(name + "/") and not rel.endswith(DONE_MARKER):
            rt.store.download(k, safe_join(dest / name, rel[len(name) + 1:]))
    return dest / name


def _register_once(rt: Runtime, job, out: Path, metrics: dict[str, Any], dataset_sha256: str | None) -> ModelRef:
    """Upload the model, then register it; a re-run after a crash finds its own version instead."""
    name = job.params["output_model"]
    with rt.db.session() as s:
        for m in s.scalars(select(Model).where(Model.name == name)):
            if (m.lineage or {}).get("job_id") == job.id:
                return ModelRef.from_row(m)
    prefix = f"models/{name}/{job.id}"
    for f in sorted(q for q in out.rglob("*") if q.is_file()):
        rt.store.upload(f"{prefix}/{f.relative_to(out).as_posix()}", f)
    digest = dir_digest(out)
    with rt.db.session() as s:
        return register(s, name, job.model.kind, rt.store.uri(prefix), backend=job.model.backend, digest=digest,
                        queue=job.model.queue, defaults=job.model.defaults,
                        lineage=_lineage(job, metrics, digest, dataset_sha256))


def _lineage(job, metrics: dict[str, Any], digest: str | None, dataset_sha256: str | None = None) -> dict[str, Any]:
    p = job.params
    return {
        "job_id": job.id, "trainer": p.get("trainer", "causal-lm"), "base_model": job.model.tag,
        "base_digest": job.model.digest,
        "dataset": p["dataset"], "dataset_sha256": dataset_sha256 or p["dataset_sha256"],
        "hyperparameters": p["hyperparameters"],
        "metrics": {k: v for k, v in metrics.items() if k != "checkpoint"}, "weights_digest": digest,
        "versions": {"aigc_runner": __version__, **library_versions()},
    }


class _Card:
    """Stands in for a generator when the output is a model card rather than generated content."""

    def __init__(self, base: ModelRef):
        self.base = base

    def describe(self) -> dict[str, Any]:
        return {"class": "finetune", "base": self.base.tag}
