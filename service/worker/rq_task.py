"""The task our RQ queue entries name, so that a stock RQ worker runs jobs one at a time next to the batching
workers (see README, "RQ worker"):

    rq worker --worker-class rq.SimpleWorker --serializer rq.serializers.JSONSerializer \\
        --url "$MMAUDIO_REDIS_URL" mmaudio-<variant>

`SimpleWorker` runs each job in the worker's own process, where the pipeline stays loaded between jobs (RQ's
default worker forks a process per job, which would load the model for every job); the entries are JSON.

An RQ worker takes the entry off the queue itself, so no batching worker can claim it any more. The task
then moves the job from `queued` to `running` in one guarded change, which is refused when the job was
canceled meanwhile or the entry belongs to an older attempt (re-queued, already run): the task returns
and writes nothing. Otherwise the job runs through the batching worker's executor as a batch of one:
the same progress reports, cancel and deadline checks, storage, webhooks and metrics. While the process
holds a pipeline it beats a worker heartbeat like ours, so the API's reaper fails (or retries) its job only
if the process dies.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import uuid
from dataclasses import dataclass

from rq import Queue, get_current_job
from rq.job import Job

from service import keys
from service.connection import connect
from service.jobs import JobStore
from service.schemas import JobStatus
from service.settings import get_settings
from service.storage import make_store
from service.worker.claims import running_fields
from service.worker.executor import RUNNING, JobExecutor, problem_of
from service.worker.runtime import Heartbeat, load_pipeline

log = logging.getLogger(__name__)


class WrongQueue(RuntimeError):
    """The RQ worker takes entries of a variant other than the one it loads (MMAUDIO_VARIANT)."""


@dataclass(frozen=True)
class Resident:
    """What an RQ worker process keeps between jobs."""

    name: str
    jobs: JobStore
    executor: JobExecutor


@functools.cache
def resident() -> Resident:
    """Load the pipeline of the configured variant, once per process (on its first job), and start beating."""
    settings = get_settings()
    redis = connect(settings)
    name = f"{socket.gethostname()}-{os.getpid()}-rq{uuid.uuid4().hex[:6]}"
    # No warm-up run: the job that triggered the load is waiting, and it warms the pipeline as well.
    pipeline = load_pipeline(settings)
    store = make_store(settings, redis)
    jobs = JobStore(redis, settings, store)
    executor = JobExecutor(redis, jobs, store, pipeline, name)
    heartbeat = Heartbeat(redis, name, settings)
    heartbeat.executor = executor
    heartbeat.loaded()
    heartbeat.start()  # a daemon thread: it stops beating when the process ends
    log.info("RQ worker process %s: %s (%s weights) loaded", name, settings.variant, settings.weights)
    return Resident(name, jobs, executor)


def run_job(job_id: str, attempt: int) -> None:
    """Run attempt ``attempt`` of job ``job_id``; an RQ worker calls this for each queue entry."""
    rq_job = get_current_job()
    assert rq_job is not None, "called by an RQ worker"
    try:
        loads = keys.queue_name(get_settings().variant)
        if rq_job.origin != loads:
            raise WrongQueue(f"this RQ worker loads the model of {loads}, not of {rq_job.origin}")
        here = resident()
    except BaseException:
        give_back(rq_job)
        raise
    taken = here.jobs.update(
        job_id,
        (JobStatus.queued,),
        JobStatus.running,
        at_attempt=attempt - 1,
        attempts=attempt,
        **running_fields(here.name, here.executor.model_info()),
    )
    if not taken.applied:
        log.info("job %s attempt %d not run: the job is %s", job_id, attempt, taken.status or "gone")
        return
    record = here.jobs.get(job_id)
    assert record is not None, "a job just taken exists"
    try:
        here.executor.finish(*here.executor.run([record], {}))
    except Exception as err:
        # A batching worker dies of such an error and the reaper ends its jobs; this process lives on with
        # its heartbeat, so the job ends here (and RQ records the error).
        error = problem_of(err)
        here.jobs.finish(record, RUNNING, JobStatus.failed, by_worker=here.name, at_attempt=attempt, error=error)
        raise


def give_back(rq_job: Job) -> None:
    """The entry cannot run here (wrong queue, the model does not load): put it back at the head of its queue
    for the other workers and stop this RQ worker after it, so that it does not take the entry again and again."""
    rq_job.connection.lpush(Queue.redis_queue_namespace_prefix + rq_job.origin, rq_job.id)
    # What RQ's shutdown command does (a warm stop: after this job), but at once rather than through pub/sub,
    # so the worker cannot take the entry again first.
    os.kill(os.getpid(), signal.SIGINT)
    log.error("entry %s put back on %s; this RQ worker stops", rq_job.id, rq_job.origin)
