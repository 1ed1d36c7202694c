"""Prometheus metrics kept in Redis, so any API replica reports the whole deployment.

Workers add each job's stage durations to Redis histograms (one hash of cumulative bucket counts per
stage); the collector reads those, the status counters, queue depths and live workers at scrape time.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from redis import Redis

from service import capacity, heartbeats, keys, queue
from service.schemas import JobStatus
from service.settings import Settings

BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, math.inf)
STAGES = keys.PREFIX + "stats:stages"  # set of stage names with a histogram


def _bucket_field(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(bound)


def record_stages(redis: Redis, seconds_by_stage: dict[str, float]) -> None:
    with redis.pipeline(transaction=False) as pipe:
        for stage, seconds in seconds_by_stage.items():
            key = keys.stage_histogram(stage)
            pipe.sadd(STAGES, stage)
            for bound in BUCKETS:
                if seconds <= bound:
                    pipe.hincrby(key, _bucket_field(bound), 1)
            pipe.hincrbyfloat(key, "sum", seconds)
        pipe.execute()


class RedisCollector(Collector):
    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.variants = settings.enabled_variants

    def collect(self) -> Iterator:
        counts = {key.decode(): int(value) for key, value in self.redis.hgetall(keys.STATUS_COUNTS).items()}
        total = CounterMetricFamily("mmaudio_jobs", "Jobs that entered each status", labels=["status"])
        for status in JobStatus:
            total.add_metric([status.value], counts.get(status.value, 0))
        yield total

        depths = {variant: queue.depth(self.redis, variant) for variant in self.variants}
        current = GaugeMetricFamily("mmaudio_jobs_current", "Jobs queued or running now", labels=["status"])
        current.add_metric([JobStatus.queued.value], sum(depths.values()))
        current.add_metric([JobStatus.running.value], self.redis.scard(keys.RUNNING_JOBS))
        yield current

        depth = GaugeMetricFamily("mmaudio_queue_depth", "Jobs waiting per variant queue", labels=["variant"])
        for variant, count in depths.items():
            depth.add_metric([variant], count)
        yield depth

        live = heartbeats.live_workers(self.redis)
        gauge = GaugeMetricFamily("mmaudio_workers", "Live workers with their model loaded", labels=["variant"])
        for variant in sorted({*self.variants, *(info["variant"] for info in live)}):
            gauge.add_metric([variant], sum(1 for info in live if info["variant"] == variant and info["ready"]))
        yield gauge

        wait = GaugeMetricFamily(
            "mmaudio_queue_wait_seconds",
            "Estimated wait of a job queued now: the jobs ahead times the recent interval between job starts "
            "(absent while no worker serves the variant)",
            labels=["variant"],
        )
        for variant, count in depths.items():
            seconds = capacity.drain(self.redis, self.settings, variant).wait_seconds(count + 1)
            if seconds is not None:
                wait.add_metric([variant], seconds)
        yield wait

        histogram = HistogramMetricFamily(
            "mmaudio_stage_duration_seconds", "Seconds each job spent per stage", labels=["stage"]
        )
        for stage in sorted(name.decode() for name in self.redis.smembers(STAGES)):
            raw = {key.decode(): float(value) for key, value in self.redis.hgetall(keys.stage_histogram(stage)).items()}
            buckets = [(_bucket_field(bound), raw.get(_bucket_field(bound), 0.0)) for bound in BUCKETS]
            histogram.add_metric([stage], buckets, sum_value=raw.get("sum", 0.0))
        yield histogram
