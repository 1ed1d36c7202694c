"""RQ glue: one queue per model variant, JSON payloads of (job id, attempt) only.

The RQ job id is ``<job id>_<attempt>``, so a job queued again after its worker died never collides with
the remains of its first attempt in RQ's registries.

Jobs are queued in RQ's format (so RQ's tools show the queues). Our workers do not dequeue them one at a
time as RQ's worker would: they claim whole batches with one script (service.worker.claims), which takes
the entries off the list and deletes their RQ job hashes. A worker may also reserve the batch it will
claim next, to decode its inputs ahead; reserved jobs stay queued. A stock `rq worker` (SimpleWorker, JSON
serializer) may serve a queue as well: it runs each entry's TASK, one job at a time, through RQ's registries
(service.worker.rq_task).
"""

from __future__ import annotations

from redis import Redis
from redis.client import Pipeline
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from service import keys

# The task RQ's job hash names: what a stock RQ worker runs (our batching workers claim jobs themselves).
TASK = "service.worker.rq_task.run_job"


def rq_queue(redis: Redis, variant: str) -> Queue:
    return Queue(keys.queue_name(variant), connection=redis, serializer=JSONSerializer)


def rq_job_id(job_id: str, attempt: int) -> str:
    return f"{job_id}_{attempt}"


def parse_rq_job_id(rq_id: str) -> tuple[str, int]:
    """(job id, attempt) of a queue entry."""
    job_id, attempt = rq_id.rsplit("_", 1)
    return job_id, int(attempt)


def list_key(variant: str) -> str:
    """The Redis list of a variant's queue: RQ job ids, the next one first."""
    return Queue.redis_queue_namespace_prefix + keys.queue_name(variant)


RQ_JOB_PREFIX = Job.redis_job_namespace_prefix  # + RQ job id: RQ's hash of a queued job
RESERVATION_PREFIX = keys.PREFIX + "reserved:"  # + job id: the worker decoding this queued job ahead


def enqueue(
    redis: Redis,
    variant: str,
    job_id: str,
    attempt: int,
    timeout_seconds: float,
    ttl_seconds: int,
    pipeline: Pipeline | None = None,
    at_front: bool = False,
) -> None:
    """Queue attempt ``attempt`` of a job; with ``pipeline`` the caller executes it (atomically with its own writes).
    RQ's hash of the entry expires after ``ttl_seconds`` (the job's own lifetime), so one left behind by a worker
    that died between its claim and deleting it goes by itself."""
    rq_queue(redis, variant).enqueue_call(
        TASK,
        args=(job_id, attempt),
        job_id=rq_job_id(job_id, attempt),
        timeout=int(timeout_seconds),  # for RQ's tools: the worker enforces the job timeout itself
        ttl=ttl_seconds,
        result_ttl=0,
        failure_ttl=3600,
        description=f"mmaudio job {job_id} attempt {attempt}",
        pipeline=pipeline,
        at_front=at_front,
    )


def withdraw(redis: Redis, variant: str, job_id: str, attempt: int) -> None:
    """Take a queued attempt off its queue (after its job was canceled)."""
    queue = rq_queue(redis, variant)
    rq_id = rq_job_id(job_id, attempt)
    with redis.pipeline() as pipe:
        queue.remove(rq_id, pipeline=pipe)
        pipe.delete(queue.job_class.key_for(rq_id))
        pipe.execute()


def forget_entries(redis: Redis, entries: list[str]) -> None:
    """Delete RQ's hashes of entries taken off the queue (outside the claim script: they cannot share its slot)."""
    if entries:
        redis.delete(*(RQ_JOB_PREFIX + entry for entry in entries))


def position(redis: Redis, variant: str, job_id: str, attempt: int, scan: int) -> int | None:
    """1-based place in the queue (1 = next to run), None when not queued. Exact within the first ``scan``
    entries (LPOS reads no further); beyond them, the queue's depth less the jobs queued after this one (by
    their numbers, keys.queued_count): constant time, low by the later jobs that already left the queue."""
    key = list_key(variant)
    with redis.pipeline(transaction=False) as pipe:
        pipe.lpos(key, rq_job_id(job_id, attempt), maxlen=scan)
        pipe.llen(key)
        pipe.get(keys.queued_count(variant))
        pipe.hget(keys.job(job_id), "queue_seq")
        index, length, last, mine = pipe.execute()
    if index is not None:
        return index + 1
    if length <= scan:
        return None
    later = int(last) - int(mine) if last is not None and mine is not None else 0
    return min(length, max(scan + 1, length - later))


def depth(redis: Redis, variant: str) -> int:
    return redis.llen(list_key(variant))
