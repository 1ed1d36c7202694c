"""Decoding the next batch while the current one runs on the GPU, so video I/O stays off the critical path.

While the worker runs a batch, the prefetcher thread reserves the batch the worker would claim next (see
service.worker.claims) and prepares each reserved job's input: fetch the upload, decode the video. It holds
at most that one batch. When the worker claims, it takes the inputs that are ready, waits for the one being
decoded and decodes the rest itself. Inputs of jobs that left the reservation (canceled, taken by an idle
worker) are dropped.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future

from service import queue
from service.jobs import JobRecord, JobStore
from service.worker.claims import QueueClaims
from service.worker.executor import JobExecutor, JobInput
from service.worker.outages import BestEffort

log = logging.getLogger(__name__)

RESERVE_INTERVAL_SECONDS = 0.1  # how often a busy worker renews its reservation and picks up new arrivals
IDLE_CHECK_SECONDS = 1.0  # how often an idle prefetcher looks at its stop flag


def discard(future: Future[JobInput]) -> None:
    """Drop a prepared (or pending, or running) input; its files go once it is done."""
    future.cancel()
    future.add_done_callback(_close_input)


def _close_input(future: Future[JobInput]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().close()


class Prefetcher(threading.Thread):
    def __init__(self, claims: QueueClaims, executor: JobExecutor, jobs: JobStore, limit: int) -> None:
        super().__init__(name="mmaudio-prefetch", daemon=True)
        self.claims = claims
        self.executor = executor
        self.jobs = jobs
        self.limit = limit
        self._busy = threading.Event()  # set while the worker runs batches
        self._stop_event = threading.Event()
        self._ahead: dict[str, Future[JobInput]] = {}  # queue entry -> its input
        self._lock = threading.Lock()
        self._reserving = BestEffort(jobs.settings.redis_reconnect_max_seconds)  # waits out an outage quietly

    def set_busy(self, busy: bool) -> None:
        """The worker started running batches (prefetch), or found nothing to claim (drop what is held: none
        of it is queued any more)."""
        if busy:
            self._busy.set()
            return
        self._busy.clear()
        self._drop_all()

    def ready_jobs(self) -> list[str]:
        """Ids of the queued jobs whose input is ready (shown in the worker's heartbeat)."""
        with self._lock:
            ready = [
                entry
                for entry, future in self._ahead.items()
                if future.done() and not future.cancelled() and future.exception() is None
            ]
        return sorted(queue.parse_rq_job_id(entry)[0] for entry in ready)

    def take(self, records: list[JobRecord]) -> dict[str, Future[JobInput]]:
        """Inputs of just-claimed jobs that are ready or being prepared, by queue entry. The caller prepares
        the others (those not started yet are withdrawn from this thread)."""
        entries = [queue.rq_job_id(record.id, record.attempts) for record in records]
        with self._lock:
            futures = {entry: self._ahead.pop(entry) for entry in entries if entry in self._ahead}
        return {entry: future for entry, future in futures.items() if not future.cancel()}

    def run(self) -> None:
        while not self._stop_event.is_set():
            if not self._busy.wait(IDLE_CHECK_SECONDS):
                continue
            try:
                self._reserving.call(self._prefetch, "reserving the next batch")
            except Exception:  # the worker decodes what it claims itself
                log.exception("prefetch failed")
            self._stop_event.wait(RESERVE_INTERVAL_SECONDS)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)
        self._drop_all()
        self.claims.release()

    def _prefetch(self) -> None:
        entries = self.claims.reserve(self.limit)
        with self._lock:
            for entry in [entry for entry in self._ahead if entry not in entries]:
                discard(self._ahead.pop(entry))
            new = [entry for entry in entries if entry not in self._ahead]
            self._ahead.update({entry: Future() for entry in new})
        for entry in new:
            with self._lock:
                future = self._ahead.get(entry)
            if future is None or not future.set_running_or_notify_cancel():
                continue  # claimed (or dropped) meanwhile
            try:
                future.set_result(self._prepare(entry))
            except Exception as err:  # the job fails with it once claimed
                future.set_exception(err)

    def _prepare(self, entry: str) -> JobInput:
        job_id, _ = queue.parse_rq_job_id(entry)
        record = self.jobs.get(job_id)
        if record is None:
            raise LookupError(f"job {job_id} no longer exists")
        return self.executor.prepare_input(record, ahead=True)

    def _drop_all(self) -> None:
        with self._lock:
            for future in self._ahead.values():
                discard(future)
            self._ahead.clear()
