"""One runtime per worker process, built after fork: database, object store, model pool."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path

from aigc_core.db import Database
from aigc_core.errors import ModelLoadError
from aigc_core.registry import ModelRef, materialize
from aigc_core.settings import Settings
from aigc_core.storage import ObjectStore, open_store
from aigc_models import Generator, load_backend
from aigc_models.base import BackendError
from worker.metrics import InstrumentedStore
from worker.pool import ModelPool


class Runtime:
    """What a worker process runs chunks with. ``pool`` and ``device`` are built on first use (the device
    imports torch); give them to run with a model pool or device of your own (tests, embedding)."""

    def __init__(self, settings: Settings, db: Database, store: ObjectStore, *,
                 publish: Callable[[str, str, int], None] | None = None, pool: ModelPool | None = None,
                 device: str | None = None):
        self.settings, self.db, self.store = settings, db, store
        # Sends released chunks of waiting jobs at once (the Celery worker sets it); None: the outbox keeps them.
        self.publish = publish
        # name@version -> the largest micro-batch that fitted after an out-of-memory split in this process.
        self.batch_caps: dict[str, int] = {}
        # The last chunk ended on a storage error: the next one checks the store before it generates.
        self.storage_failed = False
        if pool is not None:
            self.__dict__["pool"] = pool  # what the cached property below would have built
        if device is not None:
            self.__dict__["device"] = device

    @cached_property
    def worker_id(self) -> str:
        return f"{socket.gethostname()}:{os.getpid()}"

    @cached_property
    def device(self) -> str:
        from aigc_models.device import resolve_device  # imports torch: only once a model is needed

        if self.settings.torch_threads:
            import torch

            torch.set_num_threads(self.settings.torch_threads)
        return resolve_device(self.settings.device)

    @cached_property
    def uploads(self) -> ThreadPoolExecutor:
        """Threads that store a micro-batch's outputs side by side; kept for the process's life."""
        return ThreadPoolExecutor(max_workers=max(1, self.settings.storage_workers), thread_name_prefix="aigc-upload")

    @cached_property
    def committer(self) -> ThreadPoolExecutor:
        """Threads that store and commit a micro-batch while the chunk's next one generates
        (worker/overlap.py): one per chunk running at once; four serve a threads pool of four."""
        return ThreadPoolExecutor(max_workers=4, thread_name_prefix="aigc-commit")

    @cached_property
    def pool(self) -> ModelPool:
        return ModelPool(self._load, self.settings.model_memory_budget_mb * 2**20, estimate=self._weights_bytes)

    def _weights_bytes(self, ref: ModelRef) -> int:
        """The model's files on disk: what loading it will take, about, before it is loaded."""
        path = materialize(ref, self.settings.cache_dir, endpoint_url=self.settings.s3_endpoint_url)
        if isinstance(path, str):  # built-in or hub models: nothing on disk to measure
            return 0
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())

    def _load(self, ref: ModelRef) -> Generator:
        path = materialize(ref, self.settings.cache_dir, endpoint_url=self.settings.s3_endpoint_url)
        try:
            return load_backend(ref.backend, path, self.device, ref.defaults.get("dtype"),
                                self.settings.extra_backends())
        except BackendError as e:
            raise ModelLoadError(f"{ref.tag}: {e}") from e
        except Exception as e:
            # A truncated or corrupt *.safetensors (safetensors raises its own class, which no backend
            # maps): every load would fail the same way, so the items fail now, with the file named.
            # Anything else, and a SafetensorError over files that read as whole (an I/O or mmap
            # failure), takes the pipeline's crash handling: the delivery is retried.
            bad = _bad_weights(path) if type(e).__name__ == "SafetensorError" else ""
            if not bad:
                raise
            raise ModelLoadError(f"{ref.tag}: the weights cannot be read, a *.safetensors file is truncated "
                                 f"or corrupt ({e}){bad}") from e

    @classmethod
    def from_settings(cls, settings: Settings) -> Runtime:
        db = Database(settings.database_url)  # never an engine inherited across fork
        store = open_store(settings.storage_url, settings.s3_endpoint_url, settings.s3_region,
                           fast_put=settings.s3_fast_put)
        return cls(settings, db, InstrumentedStore(store))  # counts storage errors for Prometheus


_runtimes: dict[tuple[int, str], Runtime] = {}
_runtimes_lock = threading.Lock()  # the embedded CLI's warm-up thread and its main thread may both ask


def get_runtime(settings: Settings | None = None) -> Runtime:
    """One runtime per process and settings; a forked child builds its own instead of sharing the parent's."""
    settings = settings or Settings()
    key = (os.getpid(), settings.model_dump_json())
    with _runtimes_lock:
        if key not in _runtimes:
            _runtimes[key] = Runtime.from_settings(settings)
        return _runtimes[key]


def _bad_weights(path: Path | str) -> str:
    """Which of a local checkpoint's *.safetensors files are bad, and why ('' when none is found)."""
    from aigc_core.model_checks import safetensors_problem

    if isinstance(path, str):
        return ""
    bad = [f"{f.relative_to(path).as_posix()}: {p}" for f in sorted(path.rglob("*.safetensors"))
           if (p := safetensors_problem(f))]
    return f": {'; '.join(bad)}" if bad else ""
