"""Process configuration, read from ``PROMPTFLEET_*`` environment variables.

Only the service layers (api, trainer, cli) read settings; the engine takes plain
dataclass configs built from them.
"""
from __future__ import annotations

import socket
from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PROMPTFLEET_", extra="ignore")

    # --- storage and services
    data_dir: Path = Field(default=Path(".promptfleet"), description="Blobs, SQLite file, embedded broker.")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default SQLite in data_dir.")
    broker_url: str | None = Field(default=None, description="Celery broker; default an embedded SQLite broker.")
    blob_url: str | None = Field(
        default=None, description="Where adapters, datasets and built KV prefixes are stored: file:///path or "
                                  "s3://bucket/prefix (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                                  "AWS_REGION for the endpoint and credentials); default <data_dir>/blobs.")
    result_backend: str | None = None
    admin_key: str = Field(default="pf-admin-dev", description="Bearer key for /admin.")
    metrics_key: str = Field(default="", description="Bearer key /metrics asks for; empty: open (a scraper "
                             "inside the network). Metric labels carry tenant and adapter names.")
    metrics_public: bool = Field(default=False, description="Allow an empty metrics_key on a non-loopback address "
                                 "(/metrics open to anyone who can reach the port); off: the server refuses to start.")
    metrics_max_models: int = Field(default=100, ge=1, description="Distinct model label values (base model and "
                                    "adapter names) kept in metrics; later ones are counted under '_other'.")
    metrics_max_tenants: int = Field(default=100, ge=1, description="Distinct tenant label values kept in metrics; "
                                     "later ones are counted under '_other'.")
    replica_id: str = Field(default_factory=socket.gethostname, description="This replica's name: the 'replica' "
                            "label of every /metrics sample and the id /admin/cache/adapters reports; default the "
                            "hostname.")

    # --- model / engine
    model: str = Field(default="", description="GPT-2 checkpoint directory (or hub id when reachable).")
    model_id: str = Field(default="gpt2", description="Name the base model is listed under in /v1/models.")
    device: str = "cpu"
    dtype: str | None = None  # default: float32 on CPU, float16 on CUDA
    max_batch_size: int = 64
    kv_cache_mb: int = 2048
    max_queue: int = 512
    max_model_len: int = 1024
    max_step_tokens: int = Field(default=512, description="Tokens per engine step (decode rows + prompt chunks): "
                                 "lower keeps streams smoother when long prompts arrive, higher prefills faster.")
    linear_kernels: str = Field(default="auto", description="auto | avx512 | onednn | torch (CPU linears; see README).")
    attention: str = Field(default="auto", description="auto | sdpa | flash | flex | avx512 (attention backend; "
                           "see README, GPU path).")
    adapter_cache_mb: int = 256

    # --- API limits
    max_prompt_tokens: int = 768
    max_tokens_limit: int = 512
    max_beam_width: int = Field(default=8, ge=2, le=16, description="Most beams one beam-search request may ask for "
                                "(each beam holds a batch row and a KV slot while it runs).")
    tenant_max_concurrent: int = 64
    tenant_rate_per_s: float = 50.0
    tenant_rate_burst: int = 100
    max_upload_mb: int = 64
    max_dataset_mb: int = 32
    max_dataset_line_kb: int = Field(default=64, ge=1, description="Longest JSONL line of a dataset upload, checked "
                                     "before the line is parsed or tokenized.")
    limits_redis_url: str | None = Field(
        default=None, description="Redis for the per-tenant rate and concurrency limits, shared by every API replica; "
                                  "unset = counted per process.")
    limits_redis_prefix: str = "promptfleet:limits"
    limits_lease_s: float = Field(default=900.0, description="A request's concurrency slot in Redis expires after this "
                                                             "long if its replica died without releasing it.")
    tenant_max_storage_mb: float = Field(
        default=1024.0, description="Per-tenant stored bytes (live adapter versions + datasets); 0 = no limit.")
    generation_cache_size: int = 1024
    generation_cache_enabled: bool = True

    # --- trainer
    embedded_worker: bool = True
    tenant_max_running_jobs: int = 2
    job_heartbeat_s: float = 5.0
    job_stale_after_s: float = 60.0
    job_resend_after_s: float = Field(
        default=300.0, description="A job still queued this long after its broker message was sent gets the message "
                                   "again (a broker that lost it); duplicates are dropped by the claim. 0 = never.")
    job_storage_retry_s: float = Field(
        default=300.0, ge=0, description="A worker that cannot reach blob storage to read a job's dataset or write its "
                                         "adapter retries with backoff for up to this long before the job fails.")
    job_decoding_search_budget: int = Field(
        default=256, ge=0, le=100_000,
        description="After a job with validation data trains, its adapter completes up to this many validation "
                    "prompts (examples x decoding settings) to pick the version's generation defaults. 0 = off.")
    job_max_wall_s: float = Field(
        default=3600.0, description="A running training attempt that runs longer than this (wall clock, from its "
                                    "start) is stopped at its next step and fails; no adapter. 0 = no limit.")
    job_max_train_examples: int = Field(
        default=100_000, description="Per-job budget of example-passes (epochs x dataset examples, or max_steps x "
                                     "batch_size when smaller); a larger job is refused at submit. 0 = no limit.")
    tenant_train_examples_per_day: int = Field(
        default=0, description="Per-tenant budget of example-passes over the jobs created in the last 24 h (jobs "
                               "cancelled or failed before they started do not count). 0 = no limit.")
    train_threads: int = Field(
        default=0, description="torch intra-op threads of a training job; 0 = half the cores (at least 1) in the "
                               "embedded worker, torch's default in a standalone worker.")
    train_nice: int = Field(
        default=10, ge=0, le=19, description="Niceness of the embedded worker's training process, so the API and "
                                             "engine keep the CPU they need (standalone workers: unchanged).")
    embedded_train_subprocess: bool = Field(
        default=True, description="The embedded worker trains in a child process (own GIL, own torch threads, "
                                  "niced) instead of in a thread of the server process.")

    # --- logging
    log_json: bool = False
    log_level: str = "INFO"

    @field_validator("replica_id")
    @classmethod
    def _replica_or_hostname(cls, value: str) -> str:
        return value.strip() or socket.gethostname()

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'promptfleet.db').resolve()}"

    def resolved_broker_url(self) -> str:
        if self.broker_url:
            return self.broker_url
        return f"sqla+sqlite:///{(self.data_dir / 'broker.db').resolve()}"

    def resolved_result_backend(self) -> str:
        if self.result_backend:
            return self.result_backend
        if self.broker_url and self.broker_url.startswith("redis"):
            return self.broker_url
        return f"db+sqlite:///{(self.data_dir / 'results.db').resolve()}"

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def prefix_dir(self) -> Path:
        """Built KV prefixes (a disk cache; ``promptfleet gc`` drops those of deleted adapters)."""
        return self.data_dir / "prefixes"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (FastAPI dependency; tests pass their own Settings)."""
    return Settings()
