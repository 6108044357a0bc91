"""What one running app holds: the engine, the database, blob storage, the adapter device
cache (over its disk tier of built prefixes), the Celery app (and embedded worker), the
limiter, the generation cache and the metrics. Built by the app's lifespan from
``Settings``; anything passed to ``create_app`` is used as is and left for its owner to close."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine as SQLEngine
from sqlalchemy.orm import Session, sessionmaker

from promptfleet.adapters.device_cache import AdapterCache
from promptfleet.adapters.prefix_store import PrefixStore
from promptfleet.adapters.blob_url import open_blob_storage, shared_prefixes
from promptfleet.adapters.storage import BlobStorage
from promptfleet.api.gen_cache import GenerationCache
from promptfleet.api.limits import Limiter, TenantLimiter
from promptfleet.api.limits_redis import RedisTenantLimiter
from promptfleet.api.metrics import Metrics
from promptfleet.db import make_engine, make_session_factory
from promptfleet.platform.config import EngineConfig
from promptfleet.platform.engine import Engine
from promptfleet.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    db_engine: SQLEngine
    session_factory: sessionmaker[Session]
    storage: BlobStorage
    adapter_cache: AdapterCache
    prefix_store: PrefixStore
    enqueue: Callable[[str], str | None]
    metrics: Metrics
    limiter: Limiter = field(default_factory=TenantLimiter)
    gen_cache: GenerationCache = field(default_factory=lambda: GenerationCache(0))
    celery_app: Any = None
    worker: Any = None
    started_at: float = field(default_factory=time.time)
    _closers: list[Callable[[], None]] = field(default_factory=list)

    def db_ok(self) -> bool:
        try:
            with self.db_engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception:
            log.warning("database check failed", exc_info=True)
            return False

    def close(self) -> None:
        for closer in reversed(self._closers):
            try:
                closer()
            except Exception:
                log.exception("error while shutting down")
        self._closers.clear()


def engine_config(settings: Settings) -> EngineConfig:
    return EngineConfig(device=settings.device, dtype=settings.dtype, max_batch_size=settings.max_batch_size,
                        kv_cache_bytes=settings.kv_cache_mb << 20, max_queue=settings.max_queue,
                        max_model_len=settings.max_model_len, max_step_tokens=settings.max_step_tokens,
                        linear_kernels=settings.linear_kernels, attention=settings.attention)


def _celery(settings: Settings, celery_app: Any, closers: list[Callable[[], None]]) -> tuple[Any, Any]:
    from promptfleet.trainer.celery_app import make_celery, start_embedded_worker

    worker = None
    if celery_app is None:
        celery_app = make_celery(settings)
        if settings.embedded_worker:
            worker = start_embedded_worker(celery_app, loglevel=settings.log_level)
            closers.append(worker.stop)
    return celery_app, worker


def build_state(settings: Settings, metrics: Metrics, *, engine: Engine | None = None,
                celery_app: Any = None) -> AppState:
    """Build everything the app serves with; on failure, close what was already built."""
    from promptfleet.migrate import upgrade
    from promptfleet.trainer.celery_app import make_enqueue

    closers: list[Callable[[], None]] = []
    try:
        if engine is None:
            if not settings.model:
                raise RuntimeError("no backbone checkpoint configured: set PROMPTFLEET_MODEL (or --model)")
            log.info("loading model %s", settings.model)
            engine = Engine.from_pretrained(settings.model, engine_config(settings))
            closers.append(engine.stop)
        url = settings.resolved_database_url()
        upgrade(url)
        db_engine = make_engine(url)
        closers.append(db_engine.dispose)
        storage = open_blob_storage(settings.blob_url, default_root=settings.blob_dir)
        log.info("blob storage: %r", storage)
        # Device LRU over a disk tier of built prefixes (a restart reads them, not recomputes),
        # over the shared tier in the bucket when storage is S3 (another replica's builds).
        prefix_store = PrefixStore(settings.prefix_dir, weights_id=engine.weights_id, dtype=engine.dtype,
                                   device=engine.device, shared=shared_prefixes(storage))
        adapter_cache = AdapterCache(prefix_store.builder(engine.build_adapter, check_stored=False),
                                     settings.adapter_cache_mb << 20, stored=prefix_store.load)
        celery_app, worker = _celery(settings, celery_app, closers)
        metrics.bind(engine=engine, adapter_cache=adapter_cache, prefix_store=prefix_store)
        limiter: Limiter = TenantLimiter()
        if settings.limits_redis_url:  # shared by every replica
            redis_limiter = RedisTenantLimiter(settings.limits_redis_url, prefix=settings.limits_redis_prefix,
                                               lease_s=settings.limits_lease_s)
            closers.append(redis_limiter.close)
            limiter = redis_limiter
        return AppState(settings=settings, engine=engine, db_engine=db_engine,
                        session_factory=make_session_factory(db_engine), storage=storage,
                        adapter_cache=adapter_cache, prefix_store=prefix_store, enqueue=make_enqueue(celery_app),
                        metrics=metrics, limiter=limiter,
                        gen_cache=GenerationCache(settings.generation_cache_size,
                                                  enabled=settings.generation_cache_enabled),
                        celery_app=celery_app, worker=worker, _closers=closers)
    except BaseException:
        for closer in reversed(closers):
            try:
                closer()
            except Exception:
                log.exception("error while cleaning up a failed startup")
        raise
