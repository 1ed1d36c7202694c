"""`python -m service.worker`: load the model once, then run batches of jobs from the variant's queue until
stopped.

Everything runs in this one process (no fork per job), so the pipeline stays resident on the GPU. Three
threads form a pipeline, each at most one batch ahead of the next: the prefetcher decodes the inputs of the
next batch, the main thread claims batches and runs the model, the finisher encodes and stores results. A
heartbeat thread renews the worker's Redis key throughout: when the process dies, the key expires and the
API's maintenance loop fails (or retries) every job the worker was running; the jobs it had only reserved
are still queued and go to another worker.

SIGTERM or SIGINT: finish the current batch (and store its results), then exit; a second one exits at once.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from model import build
from model.pipeline import Pipeline
from model.request import GenerationRequest
from service import heartbeats
from service.connection import connect
from service.jobs import JobStore
from service.settings import Settings, get_settings
from service.storage import make_store
from service.weights import ensure_weights
from service.worker.claims import QueueClaims
from service.worker.executor import JobExecutor
from service.worker.prefetch import Prefetcher

log = logging.getLogger("service.worker")

WARMUP_SECONDS = 1.0
IDLE_WAIT_SECONDS = 1.0  # an idle worker looks at its stop flag this often


class Heartbeat(threading.Thread):
    """Renews the worker's heartbeat key every `worker_heartbeat_seconds` with its current state."""

    def __init__(self, redis: Redis, name: str, settings: Settings) -> None:
        super().__init__(name="mmaudio-heartbeat", daemon=True)
        self.redis = redis
        self.name_in_redis = name
        self.settings = settings
        self.executor: JobExecutor | None = None
        self.prefetcher: Prefetcher | None = None
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
        self.info["jobs"] = self.executor.held_jobs() if self.executor else []
        self.info["ahead"] = self.prefetcher.ready_jobs() if self.prefetcher else []
        heartbeats.beat(self.redis, self.name_in_redis, self.info, self.settings.worker_ttl_seconds)

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
    return build.load_pipeline(
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


class RedisOutage:
    """Waits out an unreachable Redis: the worker keeps its model and retries with capped exponential backoff
    instead of exiting (a supervisor's restart would only reload the model into the same outage)."""

    FIRST_DELAY_SECONDS = 0.25

    def __init__(self, max_delay_seconds: float) -> None:
        self.max_delay_seconds = max_delay_seconds
        self.delay = 0.0

    def wait(self, err: Exception) -> None:
        self.delay = min(self.max_delay_seconds, max(self.FIRST_DELAY_SECONDS, 2 * self.delay))
        log.warning("Redis unreachable (%s); retrying in %.2f s", err, self.delay)
        time.sleep(self.delay)

    def ended(self) -> None:
        if self.delay:
            log.info("Redis reachable again")
        self.delay = 0.0

    def wait_until_reachable(self, redis: Redis) -> None:
        while True:
            try:
                redis.ping()
            except (RedisConnectionError, RedisTimeoutError) as err:
                self.wait(err)
                continue
            self.ended()
            return


class WorkerLoop:
    """The main thread: claim a batch, run it, hand its results to the finisher; until asked to stop."""

    def __init__(
        self, claims: QueueClaims, executor: JobExecutor, prefetcher: Prefetcher, settings: Settings
    ) -> None:
        self.claims = claims
        self.executor = executor
        self.prefetcher = prefetcher
        self.max_batch = settings.max_batch
        self.outage = RedisOutage(settings.redis_reconnect_max_seconds)
        self.stopping = False

    def request_stop(self, signum: int, frame: object) -> None:
        if self.stopping:
            raise SystemExit(128 + signum)
        log.info("stopping after the current batch (signal %d; a second one stops at once)", signum)
        self.stopping = True

    def run(self) -> None:
        finishing: Future[None] | None = None
        with ThreadPoolExecutor(1, thread_name_prefix="mmaudio-finish") as finisher:
            while not self.stopping:
                try:
                    records = self.claims.claim(self.max_batch, self.executor.model_info())
                    if not records:
                        self.prefetcher.set_busy(False)
                        self.claims.wait_for_work(IDLE_WAIT_SECONDS)
                    self.outage.ended()
                except (RedisConnectionError, RedisTimeoutError) as err:
                    self.outage.wait(err)
                    continue
                if not records:
                    continue
                self.prefetcher.set_busy(True)
                batch, results = self.executor.run(records, self.prefetcher.take(records))
                if finishing is not None:
                    finishing.result()  # at most one batch waits for the finisher
                finishing = finisher.submit(self.executor.finish, batch, results)
            if finishing is not None:
                finishing.result()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    redis = connect(settings)
    name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    heartbeat = Heartbeat(redis, name, settings)
    RedisOutage(settings.redis_reconnect_max_seconds).wait_until_reachable(redis)
    heartbeat.beat()
    heartbeat.start()
    prefetcher: Prefetcher | None = None
    try:
        started = time.perf_counter()
        pipeline = load_pipeline(settings)
        if settings.warmup:
            warm_up(pipeline)
        log.info(
            "worker %s: %s (%s weights) loaded%s in %.1f s; batches of up to %d samples",
            name,
            settings.variant,
            settings.weights,
            " and warmed up" if settings.warmup else "",
            time.perf_counter() - started,
            settings.max_batch,
        )
        store = make_store(settings, redis)
        jobs = JobStore(redis, settings, store)
        executor = JobExecutor(redis, jobs, store, pipeline, name)
        claims = QueueClaims(jobs, settings.variant, name, settings.worker_ttl_seconds)
        prefetcher = Prefetcher(claims, executor, jobs, settings.max_batch)
        prefetcher.start()
        loop = WorkerLoop(claims, executor, prefetcher, settings)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, loop.request_stop)
        heartbeat.executor, heartbeat.prefetcher = executor, prefetcher
        heartbeat.info["ready"] = True
        heartbeat.beat()
        loop.run()
    finally:
        if prefetcher is not None:
            prefetcher.stop()
        heartbeat.stop()
        heartbeats.forget(redis, name)
