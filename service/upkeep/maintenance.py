"""Background upkeep run by every API process: abandoned jobs, overdue queued jobs, due webhooks, expired files.

Each task is safe to run in several processes at once (guarded transitions, leased claims, idempotent
deletes), so API replicas need no leader.
"""

from __future__ import annotations

import logging
import threading
import time

from redis import Redis

from service import heartbeats, keys, queue
from service.jobs import JobStore
from service.problems import problem_body
from service.schemas import JobStatus
from service.storage import BlobStore
from service.upkeep.webhooks import WebhookSender

log = logging.getLogger(__name__)

MAX_ATTEMPTS_WITH_RETRY = 2  # an abandoned job runs at most once more


class Maintenance:
    def __init__(self, redis: Redis, jobs: JobStore, store: BlobStore, webhooks: WebhookSender) -> None:
        self.redis = redis
        self.jobs = jobs
        self.settings = jobs.settings
        self.store = store
        self.webhooks = webhooks

    def tick(self) -> None:
        self.reap_abandoned()
        self.cancel_overdue()
        self.webhooks.deliver_due()
        self.store.sweep()

    def cancel_overdue(self) -> list[str]:
        """Queued jobs whose Cancel-After deadline has passed: canceled, so they never start (the worker running
        a job ends it at its next progress report). Returns the ids canceled."""
        canceled = []
        for raw in self.redis.zrangebyscore(keys.DEADLINES, "-inf", time.time()):
            job_id = raw.decode()
            record = self.jobs.get(job_id)
            if record is None or record.status.terminal:
                self.redis.zrem(keys.DEADLINES, job_id)
            elif record.status is JobStatus.queued and self.jobs.cancel_overdue(record):
                canceled.append(job_id)
        return canceled

    def reap_abandoned(self) -> list[str]:
        """Running jobs whose worker's heartbeat expired: queue them again (once, if allowed) or fail them.
        Returns the ids handled."""
        handled: list[str] = []
        running = self.jobs.running_ids()
        # INFO only when there is something to judge (every API process runs this each second)
        if not running or not heartbeats.silence_means_death(self.redis, self.settings.worker_ttl_seconds):
            return handled  # none running, or Redis just (re)started: its workers have not had the time to beat
        for job_id in running:
            record = self.jobs.get(job_id)
            if record is None or record.status is not JobStatus.running:
                self.redis.srem(keys.RUNNING_JOBS, job_id)
                continue
            if record.worker and heartbeats.is_alive(self.redis, record.worker):
                continue
            handled.append(job_id)
            guard = {"by_worker": record.worker, "at_attempt": record.attempts}
            if record.cancel_requested:
                self.jobs.finish(record, (JobStatus.running,), JobStatus.canceled, **guard)
            elif self.settings.retry_abandoned_jobs and record.attempts < MAX_ATTEMPTS_WITH_RETRY:
                timeout = record.timeout_seconds(self.settings)
                self._requeue(record.id, record.variant, record.attempts, record.worker, timeout)
            else:
                detail = f"worker {record.worker} stopped sending heartbeats during attempt {record.attempts}"
                error = problem_body("worker-lost", detail)
                self.jobs.finish(record, (JobStatus.running,), JobStatus.failed, error=error, **guard)
            log.warning("job %s: worker %s lost", job_id, record.worker)
        return handled

    def _requeue(self, job_id: str, variant: str, attempt: int, worker: str | None, timeout: float) -> None:
        # One transaction: the guarded transition back to queued and the next attempt on the queue. If the
        # guard refuses (the worker finished after all), the queued attempt is refused by the next worker too.
        with self.redis.pipeline() as pipe:
            pipe.multi()  # explicit, as RQ expects of a pipeline it enqueues on
            self.jobs.update_in(
                pipe,
                job_id,
                (JobStatus.running,),
                JobStatus.queued,
                by_worker=worker,
                at_attempt=attempt,
                worker="",
                progress={"stage": "queued", "fraction": 0.0},
            )
            queue.enqueue(
                self.redis,
                variant,
                job_id,
                attempt + 1,
                timeout,
                self.settings.upload_ttl_seconds,
                pipeline=pipe,
                at_front=True,
            )
            pipe.execute()


class MaintenanceThread(threading.Thread):
    """Runs ``Maintenance.tick`` every ``interval`` seconds until stopped."""

    def __init__(self, maintenance: Maintenance, interval: float) -> None:
        super().__init__(name="mmaudio-maintenance", daemon=True)
        self.maintenance = maintenance
        self.interval = interval
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                self.maintenance.tick()
            except Exception:  # a Redis hiccup must not end upkeep for good
                log.exception("maintenance tick failed")

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)
