"""How fast a variant's queue drains: the one estimate behind a full queue's Retry-After, a queued job's
`estimated_start_at` and the `mmaudio_queue_wait_seconds` metric.

The interval between two job starts is measured from the claims of the last `drain_window_seconds` (workers
record each claimed job); before enough claims are seen it is the recent per-job run time (the moving
average workers keep) divided by the live workers serving the variant. A job with ``ahead`` jobs before it
starts in about ``ahead`` intervals. Every read is constant time in the queue's length.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from redis import Redis

from service import heartbeats, keys
from service.settings import Settings

DEFAULT_JOB_SECONDS = 10.0  # run time assumed before any job has finished


@dataclass(frozen=True)
class Drain:
    seconds_per_job: float  # between two job starts of the variant, all its workers together
    workers: int  # live workers with the variant's model loaded

    def wait_seconds(self, jobs: int) -> float | None:
        """Time until ``jobs`` more jobs have started; None while no worker serves the variant."""
        return jobs * self.seconds_per_job if self.workers else None


def drain(redis: Redis, settings: Settings, variant: str) -> Drain:
    now = time.time()
    since = now - settings.drain_window_seconds
    with redis.pipeline(transaction=False) as pipe:
        pipe.zcount(keys.claims(variant), since, "+inf")
        pipe.zrangebyscore(keys.claims(variant), since, "+inf", start=0, num=1, withscores=True)
        pipe.hget(keys.JOB_SECONDS, variant)
        claimed, oldest, mean = pipe.execute()
    workers = sum(1 for info in heartbeats.live_workers(redis) if info["variant"] == variant and info["ready"])
    if claimed >= 2:
        return Drain(max(now - oldest[0][1], 1e-3) / claimed, workers)
    per_job = float(mean) if mean else DEFAULT_JOB_SECONDS
    return Drain(per_job / max(workers, 1), workers)


@dataclass(frozen=True)
class QueuePlace:
    """Where a queued job stands."""

    position: int  # 1 = the next job a worker takes
    estimated_start_at: float | None  # unix time; None while no worker serves the variant
