"""The Python client: submit, watch, fetch, cancel and retry jobs."""

from __future__ import annotations

import contextlib
import itertools
import json
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from functools import cached_property
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, insert, select, update
from sqlalchemy.exc import IntegrityError

from aigc_core.credentials import DETACHED_SUFFIX
from aigc_core.db import Database, database
from aigc_core.errors import NotFound, SpecError
from aigc_core.jobs import (
    JobView,
    Result,
    iter_results,
    job_by_idempotency_key,
    job_prefix,
    job_view,
    record_event,
    release_ready,
    resolve_job_id,
)
from aigc_core.notify import FinishWatch
from aigc_core.reconcile import ReconcileReport, reconcile
from aigc_core.registry import (
    BUILTIN_MODELS,
    ModelRef,
    check_job_fits,
    generation_defaults,
    has_chat_template,
    list_models,
    register_checked,
    resolve,
    safe_join,
    sync_models_file,
)
from aigc_core.schema import Chunk, ChunkStatus, Item, ItemStatus, Job, JobEvent, JobStatus, Model, utcnow
from aigc_core.settings import Settings
from aigc_core.spec import (
    JobSpec,
    chat_messages,
    check_item_count,
    check_items_container,
    check_limits,
    parse_spec,
)
from aigc_core.storage import ObjectStore, open_store
from scheduler.bulk import batch_size, submit_streaming
from scheduler.runners import Runner, default_runner


class Client:
    """``Client()`` reads AIGC_* settings. Construction does no I/O: the database is opened (and the
    embedded SQLite one migrated, the models file synced) on first use, the store likewise. How jobs
    run is the ``runner``: by default Celery workers when a broker is configured, else an in-process
    worker inside ``wait`` (scheduler/runners.py)."""

    def __init__(self, settings: Settings | None = None, *, runner: Runner | None = None, **overrides: Any):
        self.settings = settings or Settings(**overrides)
        self.runner: Runner = runner if runner is not None else default_runner(self.settings)

    @cached_property
    def db(self) -> Database:
        db = database(self.settings.database_url)
        db.ensure_schema()
        with db.session() as s:
            if not s.scalar(select(Model.id).where(Model.name == "espeak-en").limit(1)):
                sync_models_file(s, BUILTIN_MODELS, only_missing=True)
            if self.settings.models_file:
                sync_models_file(s, self.settings.models_file, endpoint_url=self.settings.s3_endpoint_url)
        return db

    @cached_property
    def store(self) -> ObjectStore:
        return open_store(self.settings.storage_url, self.settings.s3_endpoint_url, self.settings.s3_region,
                          fast_put=self.settings.s3_fast_put)

    @property
    def publish(self) -> Callable[[str, str, int], None] | None:
        """How chunks reach workers (the reconciler republishes through it); None when run in-process."""
        return self.runner.publisher

    # ---- submit -------------------------------------------------------------------------------

    def submit(self, kind: str | JobSpec | dict, model: str | None = None,
               items: Iterable[dict[str, Any] | str] | None = None, *, params: dict[str, Any] | None = None,
               seed: int | None = None, idempotency_key: str | None = None,
               metadata: dict[str, Any] | None = None, chunk_size: int | None = None,
               after: str | list[str] | None = None, system: str | None = None, reuse: bool = False) -> JobView:
        """Validate, then write the job, its items and its outbox, then publish. Up to ``STREAM_BATCH``
        items (a list) go in one transaction; more, or any other iterable, are streamed in batches with
        bounded memory while the job is ``submitting`` (scheduler/bulk.py). An item is a prompt,
        ``{"prompt": ...}``, ``{"messages": [...]}`` (a chat item; ``system`` goes in front of each)
        or ``{"from": {"job", "custom_id"}}``. ``reuse=True``: items identical to an earlier succeeded
        item (weights digest, effective parameters, rendered prompt, seed) refer to its output."""
        if isinstance(kind, JobSpec):
            job_id = self._insert(kind)
        elif isinstance(kind, dict):
            job_id = self._write({k: v for k, v in kind.items() if k != "items"}, kind.get("items"))
        else:
            job_id = self._write({"kind": kind, "model": model, "params": params or {}, "seed": seed,
                                  "idempotency_key": idempotency_key, "metadata": metadata or {},
                                  "chunk_size": chunk_size, "after": after or [], "system": system,
                                  **({"reuse": True} if reuse else {})}, items or [])
        release_ready(self.db, self.store, job_id)  # its dependencies may be final already
        self.runner.dispatch(self, job_id)
        return self.status(job_id)

    def _write(self, header: dict[str, Any], items: Any) -> str:
        """Up to one batch of items in one transaction (``_insert``); more, from a long list, a generator
        or a file, a batch at a time while the job is ``submitting`` (scheduler/bulk.py)."""
        if items is None:  # the spec's own error: "items: Field required"
            return self._insert(parse_spec(header))
        check_items_container(items)
        if isinstance(items, Sized):
            check_item_count(len(items), self.settings.limits)  # before a million items are validated
        # The header's errors come before any item is read.
        one_batch = batch_size(parse_spec({**header, "items": []}).chunk_size or self.settings.chunk_size)
        if not isinstance(items, list | tuple):  # a generator or a file: look at one batch's worth
            it = iter(items)
            head = list(itertools.islice(it, one_batch + 1))
            items = head if len(head) <= one_batch else itertools.chain(head, it)
        if isinstance(items, list | tuple) and len(items) <= one_batch:
            return self._insert(parse_spec({**header, "items": [_item(i) for i in items]}))
        return submit_streaming(self, header, items)

    def finetune(self, base_model: str, dataset: str | Path, output_model: str,
                 hyperparameters: dict[str, Any] | None = None, *, idempotency_key: str | None = None,
                 metadata: dict[str, Any] | None = None) -> JobView:
        """Fine-tune ``base_model`` on ``dataset``; the base model's kind decides the trainer: a text
        model takes a JSONL or text file, a diffusers image pipeline a folder of images with a
        ``metadata.jsonl`` (s3:// prefix, file:// or a local path, uploaded for you), the digits GAN /
        VAE builtin://sklearn-digits. On success ``output_model`` gets a new version with its lineage."""
        from scheduler.training import submit_finetune

        job_id = submit_finetune(self, base_model, dataset, output_model, hyperparameters or {},
                                 idempotency_key, metadata or {})
        self.runner.dispatch(self, job_id)
        return self.status(job_id)

    def _insert(self, spec: JobSpec) -> str:
        digest = spec.payload_digest()
        try:
            with self.db.session() as s:
                existing = job_by_idempotency_key(s, spec.idempotency_key, digest)
                if existing:
                    return existing
                deps = dependencies(s, spec)
                ref = _model_for(s, spec)
                check_limits(spec, self.settings.limits, generation_defaults(ref.defaults if ref else None))
                return _write_job(s, spec, ref, digest, spec.chunk_size or self.settings.chunk_size, deps)
        except IntegrityError:
            if not spec.idempotency_key:
                raise
            with self.db.session() as s:  # a concurrent submit with the same key won the insert
                existing = job_by_idempotency_key(s, spec.idempotency_key, digest)
                if existing:
                    return existing
            raise

    # ---- watch --------------------------------------------------------------------------------

    def _job_id(self, text: str) -> str:
        """The whole id of the job that ``text`` names: an id, or a unique prefix of 6+ characters."""
        with self.db.session() as s:
            return resolve_job_id(s, text)

    def status(self, job_id: str) -> JobView:
        with self.db.session() as s:
            return job_view(s, resolve_job_id(s, job_id), self.store)

    def jobs(self, limit: int = 20) -> list[JobView]:
        with self.db.session() as s:
            ids = s.scalars(select(Job.id).order_by(Job.created_at.desc()).limit(limit)).all()
            return [job_view(s, i, self.store) for i in ids]

    def events(self, job_id: str) -> list[dict[str, Any]]:
        with self.db.session() as s:
            job_id = resolve_job_id(s, job_id)
            rows = s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id))
            return [{"at": e.at.isoformat(), "type": e.type, **e.data} for e in rows]

    def wait(self, job_id: str, *, progress: bool = False, timeout: float | None = None,
             poll_s: float = 0.5) -> JobView:
        """Block until the job is final. Embedded mode (no broker) runs the job here, in this process
        (and the jobs it waits for)."""
        from scheduler.progress import JobProgress

        job_id = self._job_id(job_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        with JobProgress(self.status(job_id), enabled=progress) as bar:
            self.runner.drive(self, job_id, lambda: bar.refresh(lambda: self.status(job_id)))
            # Listening before the status is read: an end between the read and the sleep still wakes it.
            with FinishWatch(self.db, job_id) as watch:
                while True:
                    view = self.status(job_id)
                    bar.update(view)
                    if view.final:
                        return view
                    if deadline is not None and time.monotonic() > deadline:
                        raise TimeoutError(f"job {job_id} still {view.status.value} after {timeout}s")
                    watch.wait(poll_s if deadline is None else min(poll_s, max(0.0, deadline - time.monotonic())))

    # ---- results ------------------------------------------------------------------------------

    def results(self, job_id: str) -> Iterator[Result]:
        job_id = self.status(job_id).id  # NotFound for an unknown id
        return iter_results(self.db, job_id)

    def download(self, job_id: str, dest: str | Path) -> Path:
        """The committed outputs as ``items/{index:06d}.{ext}`` with their provenance sidecars
        (``items/{index:06d}.provenance.json``), a signed text output's detached C2PA manifest beside
        it (``items/{index:06d}.{ext}.c2pa``, what ``aigc verify`` reads), and the manifest, into
        ``dest``. Only what the database committed is fetched: objects of deliveries that lost their
        items are not outputs."""
        dest = Path(dest)
        view = self.status(job_id)
        job_id = view.id
        for r in iter_results(self.db, job_id):
            if r.key is None:
                continue
            ext = r.key.rsplit("/", 1)[1].split(".", 2)[-1]
            self.store.download(r.key, safe_join(dest, f"items/{r.index:06d}.{ext}"))
            if (r.media_type or "").startswith("text/"):  # PNG and WAV carry theirs inside the file
                with contextlib.suppress(NotFound):  # unsigned (AIGC_C2PA_SIGNING off)
                    self.store.download(r.key + DETACHED_SUFFIX,
                                        safe_join(dest, f"items/{r.index:06d}.{ext}{DETACHED_SUFFIX}"))
            # From the committed row, sidecars or not (they are off by default): the row is what the
            # sidecar held, and reading it costs no request per item.
            safe_join(dest, f"items/{r.index:06d}.provenance.json").write_bytes(
                json.dumps(r.provenance, ensure_ascii=False, indent=1, sort_keys=True).encode())
        prefix = job_prefix(job_id)
        if view.final:
            for name in ("manifest.jsonl", "errors.jsonl"):
                self.store.download(f"{prefix}/{name}", safe_join(dest, name))
        else:
            dest.mkdir(parents=True, exist_ok=True)
            (dest / "manifest.partial.jsonl").write_text(
                "".join(json.dumps(r.manifest_line()) + "\n" for r in self.results(job_id))
            )
        return dest

    # ---- control ------------------------------------------------------------------------------

    def cancel(self, job_id: str) -> JobView:
        """No new item starts; finished outputs stay; running ones stop after their micro-batch."""
        with self.db.session() as s:
            job_id = resolve_job_id(s, job_id)
            job = s.get(Job, job_id)
            if job is None:
                raise NotFound(f"no job {job_id!r}")
            if not job.status.final:
                s.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.cancelled))
                n = _rowcount(s.execute(update(Item).where(Item.job_id == job_id, Item.status == ItemStatus.pending)
                                         .values(status=ItemStatus.cancelled, finished_at=utcnow())))
                record_event(s, job_id, "cancelled", items_cancelled=n)
        reconcile(self.db, self.store, None, stale_after_s=self.settings.republish_after_s, job_id=job_id)
        return self.status(job_id)

    def retry_failed(self, job_id: str) -> int:
        """Put failed items back to pending and publish their chunks again; returns how many."""
        with self.db.session() as s:
            job_id = resolve_job_id(s, job_id)
            if s.get(Job, job_id) is None:
                raise NotFound(f"no job {job_id!r}")
            chunks = set(s.scalars(select(Item.chunk_no).where(Item.job_id == job_id,
                                                               Item.status == ItemStatus.failed)))
            if not chunks:
                return 0
            n = _rowcount(s.execute(update(Item).where(Item.job_id == job_id, Item.status == ItemStatus.failed)
                          .values(status=ItemStatus.pending, attempts=0, error=None, claim_token=None,
                                  finished_at=None)))
            s.execute(update(Job).where(Job.id == job_id)
                      .values(status=JobStatus.queued, finished_at=None))
            s.execute(update(Chunk).where(Chunk.job_id == job_id, Chunk.chunk_no.in_(chunks))
                      .values(status=ChunkStatus.pending))
            record_event(s, job_id, "retry_failed", items=n)
        self.runner.dispatch(self, job_id)
        return n

    def reconcile(self) -> ReconcileReport:
        return reconcile(self.db, self.store, self.publish, stale_after_s=self.settings.republish_after_s,
                         held=self._held, lost_after_s=self.settings.lost_message_after_s)

    @cached_property
    def _held(self):
        """Asks Redis which chunks it still holds, so the reconciler finds lost messages in one pass."""
        url = self.settings.broker_url or ""
        if not url.startswith(("redis://", "rediss://")):
            return None
        from scheduler.ops.broker import RedisChunkProbe

        # A delivered message whose chunk is still pending a lease later sits with a dead worker.
        return RedisChunkProbe(url, self.settings.broker_ssl(), unacked_stale_s=self.settings.lease_s)

    # ---- models -------------------------------------------------------------------------------

    def models(self) -> list[dict[str, Any]]:
        with self.db.session() as s:
            return [_model_dict(m) for m in list_models(s)]

    def register_model(self, name: str, kind: str, uri: str, **kw: Any) -> ModelRef:
        """A new version of ``name``; a model the workers could not fetch or load is refused first, with
        nothing written (``registry.register_checked``). ``digest`` gives an s3:// model's digest instead
        of hashing its objects now; it is checked when a worker fetches them."""
        with self.db.session() as s:
            return register_checked(s, name, kind, uri, endpoint_url=self.settings.s3_endpoint_url, **kw)

    def model(self, name: str) -> ModelRef:
        with self.db.session() as s:
            return resolve(s, name)

    # ---- OpenAI Batch files, without a server (the format of `aigc serve`: scheduler/openai_batch.py) -

    def submit_openai_batch(self, requests: str | Path | bytes | Iterable[dict[str, Any] | str], *,
                            endpoint: str | None = None, idempotency_key: str | None = None,
                            metadata: dict[str, Any] | None = None) -> JobView:
        """A job from an OpenAI Batch input file (a path, its bytes, or its lines), checked as `aigc serve`
        checks an upload. ``endpoint`` defaults to the first line's ``url``. A refused file raises
        SpecError naming the first problem's line, and writes nothing."""
        from scheduler import openai_batch as ob

        data = ob.read_input(requests, self.settings.limits.max_items_file_bytes)
        errors, view = ob.submit_requests(self, data, endpoint or ob.first_url(data),
                                          idempotency_key=idempotency_key, metadata=metadata)
        if view is None:
            raise SpecError(ob.describe_errors(errors, str(requests) if isinstance(requests, (str, Path))
                                               else "input"))
        return view

    def openai_batch_output(self, job_id: str, dest: str | Path,
                            errors_dest: str | Path | None = None) -> tuple[int, int]:
        """Write a final job's OpenAI output file to ``dest`` (one line per succeeded request, as `aigc
        serve` writes it) and its error file (failed and cancelled requests; by default
        ``<dest>.errors.jsonl``, written only when there are some); returns the lines of each."""
        from scheduler import openai_batch as ob

        dest = Path(dest)
        return ob.write_files(self, self.status(job_id), dest,
                              Path(errors_dest) if errors_dest else ob.errors_path(dest))

    def verify(self, path_or_key: str | Path) -> dict[str, Any]:
        """The C2PA manifest of a local file, or of a stored output (its Artifact key), and its validation
        state: Trusted, Valid (good signature, signer not among the trust anchors in settings), Invalid or
        Unsigned. A text output is checked with its detached manifest ("<key>.c2pa")."""
        from aigc_core.credentials import verify_source

        return verify_source(path_or_key, self.settings, self.store)


def _item(i: dict[str, Any] | str) -> dict[str, Any]:
    return {"prompt": i} if isinstance(i, str) else i


def dependencies(s, spec: JobSpec) -> list[dict[str, str]]:
    """Jobs this one waits for: ``after`` (must succeed) and the sources of ``from`` items (must end)."""
    deps = {j: "succeeded" for j in spec.after}
    wanted: dict[str, set[str]] = {}
    for it in spec.items:
        if it.source is not None:
            wanted.setdefault(it.source.job, set()).add(it.source.custom_id)
            deps.setdefault(it.source.job, "final")
    found = {j.id: j for j in s.scalars(select(Job).where(Job.id.in_(list(deps))))}
    for job_id in deps:
        if job_id not in found:
            raise SpecError(f"no job {job_id!r} to wait for (after / from)")
    for job_id, cids in wanted.items():
        if found[job_id].kind != "text":
            raise SpecError(f"'from' job {job_id} made {found[job_id].kind}; only text outputs can be read")
        have = set(s.scalars(select(Item.custom_id).where(Item.job_id == job_id, Item.custom_id.in_(cids))))
        if missing := sorted(cids - have):
            raise SpecError(f"job {job_id} has no item with custom_id {missing[0]!r}")
    return [{"job": j, "require": r} for j, r in deps.items()]


def _model_for(s, spec: JobSpec) -> ModelRef | None:
    """The model, or None when an ``after`` fine-tune will register it; resolved again at release. The
    job is checked against the model's own contract here: its backend's parameters and its context."""
    try:
        ref = resolve(s, spec.model)
    except SpecError:
        name = spec.model.partition("@")[0]
        producers = s.scalars(select(Job).where(Job.id.in_(spec.after), Job.kind == "finetune"))
        if any((j.params or {}).get("output_model") == name for j in producers):
            return None
        raise
    if ref.kind != spec.kind:
        raise SpecError(f"model {ref.tag} makes {ref.kind}, not {spec.kind}")
    check_job_fits(spec, ref)
    return ref


def _item_rows(spec: JobSpec, ref: ModelRef | None, job_id: str, seed: int, chunk_size: int,
               offset: int = 0) -> list[dict[str, Any]]:
    """The Item rows of ``spec.items``, the first being item ``offset`` of its job (streamed batches)."""
    chats = [chat_messages(spec, it) for it in spec.items]
    first_chat = next((i for i, m in enumerate(chats) if m is not None), None)
    if first_chat is not None and ref is not None and has_chat_template(ref) is False:
        raise SpecError(f"items[{first_chat}].messages: model {ref.tag} has no chat template (none in its "
                        "tokenizer_config.json or chat_template.jinja); give prompts, or register the model "
                        "with defaults.chat_template")
    return [
        {"job_id": job_id, "index": offset + i, "chunk_no": (offset + i) // chunk_size,
         "custom_id": it.custom_id if it.custom_id is not None else str(offset + i), "prompt": it.input_text,
         "source": it.source.model_dump() if it.source else None, "messages": chats[i], "params": it.params,
         "seed": seed + offset + i, "status": ItemStatus.pending, "attempts": 0}
        for i, it in enumerate(spec.items)
    ]


def _write_job(s, spec: JobSpec, ref: ModelRef | None, digest: str, chunk_size: int,
               deps: list[dict[str, str]]) -> str:
    seed = spec.seed if spec.seed is not None else secrets.randbelow(2**31)
    job = Job(kind=spec.kind, model_name=ref.name if ref else spec.model.partition("@")[0],
              model_version=ref.version if ref else None, queue=ref.queue if ref else spec.kind,
              status=JobStatus.waiting if deps else JobStatus.queued, params=spec.params, seed=seed,
              meta=spec.metadata, idempotency_key=spec.idempotency_key, payload_digest=digest,
              item_count=len(spec.items), chunk_size=chunk_size, depends_on=deps, reuse=spec.reuse)
    s.add(job)
    s.flush()
    rows = _item_rows(spec, ref, job.id, seed, chunk_size)
    for k in range(0, len(rows), 5000):
        s.execute(insert(Item), rows[k : k + 5000])
    n_chunks = (len(rows) + chunk_size - 1) // chunk_size
    now = utcnow()
    first = ChunkStatus.held if deps else ChunkStatus.pending
    s.execute(insert(Chunk), [{"job_id": job.id, "chunk_no": c, "status": first,
                               "publish_count": 0, "created_at": now} for c in range(n_chunks)])
    record_event(s, job.id, "submitted", items=len(rows), chunks=n_chunks,
                 model=ref.tag if ref else spec.model, waits_for=[d["job"] for d in deps])
    return job.id


def _model_dict(m: Model) -> dict[str, Any]:
    return {"name": m.name, "version": m.version, "tag": f"{m.name}@{m.version}", "kind": m.kind,
            "backend": m.backend, "uri": m.uri, "digest": m.digest, "queue": m.queue,
            "defaults": m.defaults, "lineage": m.lineage, "created_at": m.created_at.isoformat()}


def _rowcount(result: Any) -> int:
    """Rows an UPDATE matched (``Session.execute`` is typed as returning a plain Result)."""
    return int(cast(CursorResult[Any], result).rowcount)
