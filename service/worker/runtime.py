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

from model import build
from model.pipeline import Pipeline
from model.request import GenerationRequest
from service import heartbeats, keys
from service.connection import connect
from service.jobs import JobRecord, JobStore
from service.schemas import JobStatus
from service.settings import Settings, get_settings
from service.storage import make_store
from service.weights import ensure_weights
from service.worker.claims import QueueClaims
from service.worker.executor import JobExecutor
from service.worker.outages import REDIS_DOWN, RedisOutage
from service.worker.prefetch import Prefetcher

log = logging.getLogger("service.worker")

WARMUP_SECONDS = 1.0
IDLE_WAIT_SECONDS = 1.0  # an idle worker looks at its stop flag this often
REDIS_CONNECT_TIMEOUT_SECONDS = 5.0  # an unreachable host fails a try this soon instead of after minutes


class Heartbeat(threading.Thread):
    """Renews the worker's heartbeat key every `worker_heartbeat_seconds` with its current state.

    A worker is `ready` (what /readyz counts) once it has run `worker_stable_seconds` since its model loaded
    and warmed up (`loaded_at`): the key of a worker that dies sooner, as one crash-looping under a supervisor
    does, never says ready, and expires with its TTL."""

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
            "loaded_at": None,
        }
        self._stop_event = threading.Event()

    def loaded(self) -> None:
        """The model is loaded and warmed up: the worker becomes ready once it has stayed up long enough."""
        self.info["loaded_at"] = time.time()
        self.beat()

    def _stable_in(self) -> float | None:
        """Seconds until the loaded worker has run `worker_stable_seconds`; None before loading."""
        loaded_at = self.info["loaded_at"]
        return None if loaded_at is None else loaded_at + self.settings.worker_stable_seconds - time.time()

    def beat(self) -> None:
        stable_in = self._stable_in()
        self.info["ready"] = stable_in is not None and stable_in <= 0
        self.info["jobs"] = self.executor.held_jobs() if self.executor else []
        self.info["ahead"] = self.prefetcher.ready_jobs() if self.prefetcher else []
        heartbeats.beat(self.redis, self.name_in_redis, self.info, self.settings.worker_ttl_seconds)

    def run(self) -> None:
        while not self._stop_event.wait(self._next_beat_in()):
            try:
                self.beat()
            except REDIS_DOWN as err:  # keep beating through an outage; the worker waits it out
                log.warning("heartbeat failed: Redis unreachable (%s)", err)
            except Exception:
                log.exception("heartbeat failed")

    def _next_beat_in(self) -> float:
        """The beat interval, shorter once so that readiness is announced as soon as it is reached."""
        stable_in = self._stable_in()
        interval = self.settings.worker_heartbeat_seconds
        return interval if self.info["ready"] or stable_in is None else min(interval, max(stable_in, 0.0) + 0.01)

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
        compile_modules=settings.compile,
        compile_mode=settings.compile_mode,
        cudnn_benchmark=settings.cudnn_benchmark,
        window_overlap=settings.window_overlap_seconds,
        window_schedule=settings.window_schedule,
        window_batch=settings.window_batch,
        encoder_chunk=settings.encoder_chunk,
    )


def warm_up(pipeline: Pipeline) -> None:
    """One short generation, so the first job does not pay for lazy initialisation (kernels, allocator)."""
    pipeline.generate(GenerationRequest(duration=WARMUP_SECONDS, num_steps=1))


class WorkerLoop:
    """The main thread: claim a batch, run it, hand its results to the finisher; until asked to stop."""

    def __init__(self, claims: QueueClaims, executor: JobExecutor, prefetcher: Prefetcher, settings: Settings) -> None:
        self.claims = claims
        self.executor = executor
        self.prefetcher = prefetcher
        self.max_batch = settings.max_batch
        self.outage = RedisOutage(settings.redis_reconnect_max_seconds)
        self.after_outage = False  # an outage may have cut off a claim's reply: look for its jobs once
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
                    records = self._claimed_unawares() if self.after_outage else []
                    self.after_outage = False
                    records = records or self.claims.claim(self.max_batch, self.executor.model_info())
                    if not records:
                        self.prefetcher.set_busy(False)
                        self.claims.wait_for_work(IDLE_WAIT_SECONDS)
                    self.outage.ended()
                except REDIS_DOWN as err:
                    self.after_outage = True
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

    def _claimed_unawares(self) -> list[JobRecord]:
        """Jobs running under this worker's name that it does not hold: taken by a claim whose reply an outage
        cut off. They are run now; the reaper never takes them (the worker is alive), so they would stay
        `running` otherwise."""
        jobs, held = self.claims.jobs, set(self.executor.held_jobs())  # held first: a job ends before its release
        unheld = [job_id for job_id in jobs.running_ids() if job_id not in held]
        raws = {job_id: jobs.redis.hgetall(keys.job(job_id)) for job_id in unheld}
        records = [JobRecord.readable(job_id, raw) for job_id, raw in raws.items() if raw]
        found = [
            record
            for record in records
            if record is not None and record.status is JobStatus.running and record.worker == self.claims.worker_name
        ]
        if found:
            log.warning("running %d job(s) claimed when Redis went away: %s", len(found), [r.id for r in found])
        return found


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    redis = connect(settings, socket_connect_timeout=REDIS_CONNECT_TIMEOUT_SECONDS)
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
        heartbeat.loaded()
        loop.run()
    finally:
        if prefetcher is not None:
            prefetcher.stop()
        heartbeat.stop()
        heartbeats.forget(redis, name)
