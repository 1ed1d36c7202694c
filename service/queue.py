"""RQ glue: one queue per model variant, JSON payloads of (job id, attempt) only.

The RQ job id is ``<job id>_<attempt>``, so a job queued again after its worker died never collides with
the remains of its first attempt in RQ's registries.
"""

from __future__ import annotations

from redis import Redis
from redis.client import Pipeline
from rq import Queue
from rq.serializers import JSONSerializer

from service import keys

TASK = "service.worker.tasks.run_job"


def rq_queue(redis: Redis, variant: str) -> Queue:
    return Queue(keys.queue_name(variant), connection=redis, serializer=JSONSerializer)


def rq_job_id(job_id: str, attempt: int) -> str:
    return f"{job_id}_{attempt}"


def enqueue(
    redis: Redis,
    variant: str,
    job_id: str,
    attempt: int,
    timeout_seconds: float,
    pipeline: Pipeline | None = None,
    at_front: bool = False,
) -> None:
    """Queue attempt ``attempt`` of a job; with ``pipeline`` the caller executes it (atomically with its own writes)."""
    rq_queue(redis, variant).enqueue_call(
        TASK,
        args=(job_id, attempt),
        job_id=rq_job_id(job_id, attempt),
        timeout=int(timeout_seconds) + 60,  # RQ's hard stop backs up the worker's own deadline
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


def position(redis: Redis, variant: str, job_id: str, attempt: int) -> int | None:
    """1-based place in the queue (1 = next to run), None when not queued."""
    index = redis.lpos(rq_queue(redis, variant).key, rq_job_id(job_id, attempt))
    return None if index is None else index + 1


def depth(redis: Redis, variant: str) -> int:
    return redis.llen(rq_queue(redis, variant).key)
