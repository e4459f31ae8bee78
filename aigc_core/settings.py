"""Settings from the environment (prefix ``AIGC_``); only entry points read them."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Limits(BaseSettings):
    """Limits checked at submit; each can be raised per deployment."""

    model_config = SettingsConfigDict(env_prefix="AIGC_LIMIT_", extra="ignore")

    max_items_per_job: int = 100_000
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
    broker_url: str | None = None
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
    model_memory_budget_mb: int = 8192
    storage_workers: int = 8
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
    scheduler_tick_s: float = Field(15.0, gt=0)
    scheduler_grace_s: float = Field(60.0, ge=0)
    reconcile_every_s: float = Field(30.0, gt=0)
    limits: Limits = Field(default_factory=Limits)

    @property
    def embedded(self) -> bool:
        return not self.broker_url
