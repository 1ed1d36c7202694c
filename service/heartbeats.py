"""Worker heartbeats: each live worker renews a Redis key with a TTL; an expired key means a dead worker."""

from __future__ import annotations

import json
from typing import Any

from redis import Redis
from redis.exceptions import ResponseError

from service import keys


def beat(redis: Redis, name: str, info: dict[str, Any], ttl_seconds: float) -> None:
    with redis.pipeline() as pipe:
        pipe.set(keys.worker(name), json.dumps(info), px=int(ttl_seconds * 1000))
        pipe.sadd(keys.WORKERS, name)
        pipe.execute()


def forget(redis: Redis, name: str) -> None:
    with redis.pipeline() as pipe:
        pipe.delete(keys.worker(name))
        pipe.srem(keys.WORKERS, name)
        pipe.execute()


def is_alive(redis: Redis, name: str) -> bool:
    return bool(redis.exists(keys.worker(name)))


def silence_means_death(redis: Redis, ttl_seconds: float) -> bool:
    """Whether a missing heartbeat means a dead worker now. Not until Redis has run for a heartbeat's lifetime:
    heartbeats that expired while it was down (or were lost with it) say nothing of the workers, which beat
    again within an interval of its return. Without INFO (a restricted managed Redis) missing means dead."""
    try:
        uptime = redis.info("server")["uptime_in_seconds"]
    except ResponseError:
        return True
    return float(uptime) >= ttl_seconds


def live_workers(redis: Redis) -> list[dict[str, Any]]:
    """Info of every worker whose heartbeat has not expired; forgets the dead ones."""
    names = [name.decode() for name in redis.smembers(keys.WORKERS)]
    if not names:
        return []
    infos = redis.mget([keys.worker(name) for name in names])
    dead = [name for name, info in zip(names, infos, strict=True) if info is None]
    if dead:
        redis.srem(keys.WORKERS, *dead)
    return [json.loads(info) for info in infos if info is not None]
