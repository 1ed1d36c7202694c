"""Riding out a Redis outage in a worker: the process keeps its model and its running jobs, and nothing it
does makes it exit because Redis went away (restarted, failed over, unreachable for a while).

Three kinds of calls, three policies:
- waiting for work (claims, the first connection): retried with capped exponential backoff, forever;
- a running job's reads and writes (its input, its result, its final status): retried the same way. A job's
  data is retried for a bounded time (then the job fails with `redis-unavailable`); its final status until
  Redis answers, so that a job never stays `running` behind a live worker;
- progress reports: skipped while Redis is down (sampling never waits for them) and tried again after the
  same backoff, so an outage costs the job nothing but progress updates.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Redis is away, not refusing this call: unreachable, still loading its data after a restart (BusyLoadingError
# is a ConnectionError), or a replica until a failover completes. Retrying later is the answer.
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, ReadOnlyError)


class Backoff:
    """Capped exponential delays: 0.25 s, 0.5 s, 1 s, ... up to ``max_delay_seconds``."""

    FIRST_DELAY_SECONDS = 0.25

    def __init__(self, max_delay_seconds: float) -> None:
        self.max_delay_seconds = max_delay_seconds
        self.delay = 0.0

    def next(self) -> float:
        self.delay = min(self.max_delay_seconds, max(self.FIRST_DELAY_SECONDS, 2 * self.delay))
        return self.delay

    def reset(self) -> bool:
        """Back to the first delay; whether there was an outage to end."""
        had_failed, self.delay = bool(self.delay), 0.0
        return had_failed


class RedisOutage:
    """Waits out an unreachable Redis: sleeps the next backoff delay after each failed try (a supervisor's
    restart would only reload the model into the same outage)."""

    def __init__(self, max_delay_seconds: float) -> None:
        self.backoff = Backoff(max_delay_seconds)

    def wait(self, err: Exception, doing: str = "waiting for work") -> None:
        delay = self.backoff.next()
        log.warning("Redis unreachable while %s (%s); retrying in %.2f s", doing, err, delay)
        time.sleep(delay)

    def ended(self) -> None:
        if self.backoff.reset():
            log.info("Redis reachable again")

    def wait_until_reachable(self, redis: Redis) -> None:
        persist(redis.ping, "connecting", self.backoff.max_delay_seconds)


def persist(call: Callable[[], T], doing: str, max_delay_seconds: float, give_up_seconds: float | None = None) -> T:
    """``call()``, tried again after each backoff delay while Redis is down; after ``give_up_seconds`` (when
    given) the last error is raised. The calls retried this way are idempotent (or fenced: see `_end` in
    executor.py), so a try whose reply was lost does no harm when repeated."""
    outage = RedisOutage(max_delay_seconds)
    give_up_at = None if give_up_seconds is None else time.monotonic() + give_up_seconds
    while True:
        try:
            result = call()
        except REDIS_DOWN as err:
            if give_up_at is not None and time.monotonic() >= give_up_at:
                log.error("Redis unreachable for over %.0f s while %s; giving up", give_up_seconds, doing)
                raise
            outage.wait(err, doing)
            continue
        outage.ended()
        return result


class BestEffort:
    """Calls that may be skipped (progress reports): while Redis is down each is dropped at once (None) and
    the next try waits for a backoff delay, so that the caller never blocks on an outage."""

    def __init__(self, max_delay_seconds: float) -> None:
        self.backoff = Backoff(max_delay_seconds)
        self.retry_at = 0.0

    def call(self, call: Callable[[], T], doing: str) -> T | None:
        if time.monotonic() < self.retry_at:
            return None
        try:
            result = call()
        except REDIS_DOWN as err:
            delay = self.backoff.next()
            self.retry_at = time.monotonic() + delay
            log.warning("Redis unreachable while %s (%s); skipped, next try in %.2f s", doing, err, delay)
            return None
        if self.backoff.reset():
            log.info("Redis reachable again: %s resumed", doing)
        return result
