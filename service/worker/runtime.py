"""`python -m service.worker`: load the model once, then take jobs from the variant's queue until stopped.

RQ's SimpleWorker runs each job in this process (no fork per job), so the pipeline stays resident on the
GPU. A heartbeat thread renews the worker's Redis key throughout, also while a job computes: when the
process dies, the key expires and the API's maintenance loop deals with its running job.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

import torch
from redis import Redis
from rq import SimpleWorker
from rq.serializers import JSONSerializer

from model.pipeline import GenerationRequest, Pipeline
from service import keys, workers
from service.jobs import JobStore
from service.settings import Settings, get_settings
from service.storage import make_store
from service.weights import ensure_weights
from service.worker import tasks
from service.worker.executor import JobExecutor

log = logging.getLogger("service.worker")

WARMUP_SECONDS = 1.0


class Heartbeat(threading.Thread):
    """Renews the worker's heartbeat key every `worker_heartbeat_seconds` with its current state."""

    def __init__(self, redis: Redis, name: str, settings: Settings) -> None:
        super().__init__(name="mmaudio-heartbeat", daemon=True)
        self.redis = redis
        self.name_in_redis = name
        self.settings = settings
        self.executor: JobExecutor | None = None
        self.info: dict[str, Any] = {
            "name": name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "variant": settings.variant,
            "weights": settings.weights,
            "ready": False,
            "started_at": time.time(),
        }
        self._stop_event = threading.Event()

    def beat(self) -> None:
        self.info["job"] = self.executor.current_job if self.executor else None
        workers.beat(self.redis, self.name_in_redis, self.info, self.settings.worker_ttl_seconds)

    def run(self) -> None:
        while not self._stop_event.wait(self.settings.worker_heartbeat_seconds):
            try:
                self.beat()
            except Exception:  # keep beating through a Redis hiccup
                log.exception("heartbeat failed")

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


def load_pipeline(settings: Settings) -> Pipeline:
    ensure_weights(settings)
    return Pipeline.load(
        settings.variant,
        weights=settings.weights,
        weights_dir=settings.weights_dir,
        device=settings.device,
        dtype=getattr(torch, settings.dtype) if settings.dtype else None,
        frame_path=settings.frame_path,
    )


def warm_up(pipeline: Pipeline) -> None:
    """One short generation, so the first job does not pay for lazy initialisation (kernels, allocator)."""
    pipeline.generate(GenerationRequest(duration=WARMUP_SECONDS, num_steps=1))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    redis = Redis.from_url(settings.redis_address)
    name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    heartbeat = Heartbeat(redis, name, settings)
    heartbeat.beat()
    heartbeat.start()
    try:
        started = time.perf_counter()
        pipeline = load_pipeline(settings)
        if settings.warmup:
            warm_up(pipeline)
        log.info(
            "worker %s: %s (%s weights) loaded%s in %.1f s",
            name,
            settings.variant,
            settings.weights,
            " and warmed up" if settings.warmup else "",
            time.perf_counter() - started,
        )
        store = make_store(settings, redis)
        executor = JobExecutor(redis, JobStore(redis, settings, store), store, pipeline, name)
        tasks.install(executor)
        heartbeat.executor = executor
        heartbeat.info["ready"] = True
        heartbeat.beat()
        worker = SimpleWorker(
            [keys.queue_name(settings.variant)], name=name, connection=redis, serializer=JSONSerializer
        )
        worker.work(logging_level="INFO")
    finally:
        heartbeat.stop()
        workers.forget(redis, name)
