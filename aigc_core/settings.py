"""Settings from the environment (prefix ``AIGC_``); only entry points read them."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Limits(BaseSettings):
    """Limits checked at submit; each can be raised per deployment."""

    model_config = SettingsConfigDict(env_prefix="AIGC_LIMIT_", extra="ignore")

    # Jobs over 10,000 items (or given as a generator or a JSONL file) are written a batch at a time
    # with bounded memory (scheduler/bulk.py), so the limit is about the database, not the client.
    max_items_per_job: int = 5_000_000
    # Input files are refused by size before they are read: an items JSONL file (streamed, one
    # line at a time), and a YAML file (job, schedules, models), which is parsed whole.
    max_items_file_bytes: int = 256 * 1024 * 1024
    max_yaml_file_bytes: int = 16 * 1024 * 1024
    # How deeply params / metadata / any value in an input file may nest.
    max_nesting_depth: int = 32
    max_prompt_bytes: int = 16_384
    max_new_tokens: int = 1024
    max_custom_id_chars: int = 128
    max_metadata_bytes: int = 16_384
    max_image_pixels: int = 1024 * 1024
    max_inference_steps: int = 200
    max_tts_chars: int = 5_000
    max_audio_seconds: float = 600.0


class Settings(BaseSettings):
    """Every knob of the runner. Unset broker means the embedded in-process worker."""

    model_config = SettingsConfigDict(env_prefix="AIGC_", extra="ignore")

    database_url: str = "sqlite:///aigc.db"
    storage_url: str = "file://./aigc-data"
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    # Small PUTs (outputs, sidecars) as one signed request each, beside botocore (aigc_core/s3put.py):
    # a third of botocore's CPU per object. Any failure goes to botocore; false: botocore only.
    s3_fast_put: bool = True
    broker_url: str | None = None
    # TLS to Redis, for a ``rediss://`` broker URL: certificates are verified unless
    # broker_ssl_cert_reqs says otherwise. ssl_* query parameters in the URL take precedence.
    broker_ssl_cert_reqs: Literal["required", "optional", "none"] = "required"
    broker_ssl_ca_certs: str | None = None
    broker_ssl_certfile: str | None = None
    broker_ssl_keyfile: str | None = None
    # Redis re-delivers an unacked message after this; longer than the longest chunk.
    visibility_timeout_s: int = 3600
    models_file: str | None = None
    cache_dir: Path = Field(default_factory=lambda: Path.home() / ".cache" / "aigc")
    device: str = "auto"
    # CPU threads per worker process for torch; unset keeps torch's default. Tiny models on a shared
    # CPU run faster on one thread than on several that spin-wait for each other.
    torch_threads: int | None = None
    chunk_size: int = 32
    micro_batch_size: int = 16
    lease_s: int = 600
    max_attempts: int = 3
    # A published chunk whose items are still pending after this is published again.
    republish_after_s: int = 3600
    # A published chunk with pending items that the broker holds no message for (asked by the
    # reconciler: Redis restarted empty, a task that failed outright) is published again after this.
    lost_message_after_s: float = Field(15.0, ge=0)
    model_memory_budget_mb: int = 8192
    # Backends beyond the built-in table, for workers: "name=package.module:Class" (comma-separated),
    # e.g. a custom generator, or the benchmarks' null backend (bench/null.py). A model registered
    # with such a backend runs only on workers that have this setting and can import the module.
    backends: str = ""
    # Upload threads per worker process: a micro-batch's PUTs side by side. As many as a micro-batch
    # has items, so against S3 20-50 ms away a batch is stored in one round trip, not two.
    storage_workers: int = 16
    # A micro-batch's outputs are stored and committed while the chunk's next micro-batch generates
    # (worker/overlap.py; one batch in flight). False: each batch is stored before the next begins.
    overlap_storage: bool = True
    # Each output's provenance as a `NNNNNN.provenance.json` object beside it too. Off (the default):
    # provenance lives in the Artifact row (and inside PNG/WAV files and their C2PA manifests), and each
    # item costs one PUT, not two: the sidecar was a third of the machinery per item (bench.machinery).
    provenance_sidecars: bool = False
    # C2PA content credentials (aigc_core/credentials.py, worker/credentials.py): each PNG and WAV is
    # signed in the worker before it is stored; a text output gets a detached manifest, "<key>.c2pa".
    # "auto": "optional" when a certificate and key are configured, else "off". "optional": an output
    # that cannot be signed is stored unsigned, with a warning; "required": its item fails with the
    # reason, nothing unsigned is stored. `aigc credentials init` makes a test CA and signer.
    c2pa_signing: Literal["auto", "off", "optional", "required"] = "auto"
    # The chain (PEM, signing certificate first, then its CAs) and the private key (unencrypted PEM), each
    # as a path or as the PEM itself in the environment (the PEM wins). The key is never logged or shown.
    c2pa_cert_file: str | None = None
    c2pa_cert_pem: str | None = None
    c2pa_key_file: str | None = None
    c2pa_key_pem: SecretStr | None = None
    # Roots `aigc verify` trusts (a PEM bundle, path or inline); without them a good signature reads Valid.
    c2pa_trust_anchors_file: str | None = None
    c2pa_trust_anchors_pem: str | None = None
    # A thumbnail in each PNG manifest: 20-50x the signing time, tens to hundreds of KB (bench/c2pa_sign.py).
    c2pa_thumbnail: bool = False
    # Logs: one JSON object a line (with job_id / chunk / item) instead of text; the level for
    # long-running commands (worker, scheduler, metrics); short commands log warnings only unless set.
    log_json: bool = False
    log_level: str | None = None
    # Prometheus: `aigc metrics` / `aigc scheduler` serve the database and queue gauges on this port;
    # each worker process serves its own metrics on the first free port from worker_metrics_port up.
    metrics_port: int | None = Field(None, ge=1, le=65535)
    worker_metrics_port: int | None = Field(None, ge=1, le=65535)
    # Flower's basic auth, "user:password" (comma-separated for several); `aigc flower` refuses to
    # start without it unless --unauthenticated is given.
    flower_basic_auth: SecretStr | None = None
    # Cron schedules (``aigc scheduler``): the file synced into the database, how often due slots
    # are checked, how late a slot may still fire under catch-up "none", how often the reconciler runs.
    schedules_file: str | None = None
    # Items files named in job files and schedules as s3://bucket/key are read from the storage bucket
    # (storage_url) only, and from the buckets named here (comma-separated).
    items_file_buckets: str = ""
    scheduler_tick_s: float = Field(15.0, gt=0)
    scheduler_grace_s: float = Field(60.0, ge=0)
    reconcile_every_s: float = Field(30.0, gt=0)
    # Retention (``aigc gc``, aigc_core/retention.py): the scheduler removes finished jobs older than
    # this ("30d", "12h"; empty: never) every gc_every_s, with their stored objects if gc_objects.
    gc_older_than: str = Field("", pattern=r"^\s*(0*[1-9]\d*\s*[smhdwSMHDW])?\s*$")
    gc_objects: bool = False
    gc_every_s: float = Field(3600.0, gt=0)
    # OpenAI-compatible Batch API (``aigc serve``; scheduler/openai_batch.py): an upload larger than
    # api_max_file_bytes is refused with 413 before it is stored; a batch file (uploaded, or given to
    # ``aigc submit --openai-batch``) may hold up to api_max_batch_requests requests (and no more than
    # limits.max_items_per_job).
    api_max_file_bytes: int = Field(50 * 1024 * 1024, ge=1)
    api_max_batch_requests: int = Field(50_000, ge=1)
    limits: Limits = Field(default_factory=Limits)

    @property
    def embedded(self) -> bool:
        return not self.broker_url

    def extra_backends(self) -> dict[str, str]:
        """``backends`` as {name: "module:Class"}; a malformed entry is refused with the whole setting."""
        table: dict[str, str] = {}
        for entry in filter(None, (e.strip() for e in self.backends.split(","))):
            name, sep, target = (x.strip() for x in entry.partition("="))
            module, colon, cls = target.partition(":")
            if not (sep and name and module and colon and cls):
                raise ValueError(f"AIGC_BACKENDS: {entry!r} is not name=package.module:Class")
            table[name] = target
        return table

    def broker_ssl(self) -> dict[str, Any] | None:
        """Celery's ``broker_use_ssl`` (and redis-py's keyword arguments) for a ``rediss://`` broker, else None.

        Without it kombu connects to ``rediss://`` with certificate checks off; here they are on by default.
        """
        if not self.broker_url or urlsplit(self.broker_url).scheme != "rediss":
            return None
        opts: dict[str, Any] = {"ssl_cert_reqs": _CERT_REQS[self.broker_ssl_cert_reqs]}
        for key in ("ca_certs", "certfile", "keyfile"):
            if value := getattr(self, f"broker_ssl_{key}"):
                opts[f"ssl_{key}"] = value
        return opts


_CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}


def mask_url(url: str | None) -> str:
    """A URL fit to print or log: its password (``redis://:pw@host``, ``postgresql://u:pw@host``) becomes ***."""
    if not url:
        return str(url)
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    except ValueError:  # not a URL we can take apart: show its scheme only
        return url.split("://", 1)[0] + "://***" if "://" in url else "***"
