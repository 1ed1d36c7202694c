"""Dynamic batching: queued jobs with the same duration and step count share one model pass yet end on their
own, and a worker decodes the next batch while the current one runs.

The claim and reserve scripts are checked on a real Redis without a worker; the rest end to end (real
redis-server, worker and API) with the tiny small_16k weights, 1 s clips and few steps. A "blocker" job
keeps the worker busy while a test queues jobs, and is canceled to let them run: nothing here depends on
how fast this machine happens to be.
"""

from __future__ import annotations

import io
import json
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import av
import httpx
import numpy as np
import pytest
import torch
from redis import Redis
from service_harness import (
    CLIENT_TIMEOUT,
    Media,
    Stack,
    form,
    make_stack,
    wait_for_sampling,
    wait_for_status,
    wait_until,
)

from model.build import tiny_pipeline
from model.pipeline import PreparedRequest, ProgressCallback
from service import heartbeats, keys, queue
from service.jobs import JobRecord, JobStore
from service.schemas import EffectiveParams, InputInfo, JobStatus, ModelInfo, WeightsInfo
from service.settings import Settings
from service.storage import RedisStore, result_name
from service.worker.claims import QueueClaims
from service.worker.executor import JobExecutor

VARIANT = "small_16k"
MODEL = ModelInfo(variant=VARIANT, weights=WeightsInfo(kind="tiny", random_weights=True))
BATCH_SETTINGS = {
    "MMAUDIO_WEIGHTS": "tiny",
    "MMAUDIO_VARIANT": VARIANT,
    "MMAUDIO_MAX_NUM_STEPS": "1000",
    "MMAUDIO_WORKER_HEARTBEAT_SECONDS": "0.5",
    "MMAUDIO_WORKER_TTL_SECONDS": "2",
    "MMAUDIO_MAINTENANCE_INTERVAL_SECONDS": "0.25",
}
LONG = {"duration": 1.0, "num_steps": 1000}  # runs until canceled or killed, however fast the machine
SHORT = {"duration": 1.0, "num_steps": 2}
CANCEL_SECONDS = 10.0  # a canceled job stops at its next step: well within this, even on a busy machine


# --- claims, on Redis alone -------------------------------------------------------------------------------------


@pytest.fixture
def job_store(redis_server: str) -> Iterator[JobStore]:
    redis = Redis.from_url(f"{redis_server}/7")
    redis.flushdb()
    yield JobStore(redis, Settings(_env_file=None, variant=VARIANT), RedisStore(redis))
    redis.flushdb()


def queue_job(
    jobs: JobStore,
    duration: float,
    num_steps: int = 2,
    num_samples: int = 1,
    prompt: str = "",
    deadline: float | None = None,
) -> str:
    params = {
        "prompt": prompt,
        "negative_prompt": "",
        "duration": duration,
        "num_steps": num_steps,
        "cfg_strength": 4.5,
        "seed": 1,
        "mask_away_clip": False,
        "num_samples": num_samples,
        "variant": VARIANT,
        "output_format": "flac",
    }
    record = JobRecord(
        str(uuid.uuid4()),
        "test",
        JobStatus.queued,
        time.time(),
        EffectiveParams(**params),
        InputInfo(kind="text"),
        MODEL,
        deadline=deadline,
    )
    jobs.create(record)
    return record.id


def worker_claims(jobs: JobStore, name: str) -> QueueClaims:
    heartbeats.beat(jobs.redis, name, {"name": name}, ttl_seconds=60)
    return QueueClaims(jobs, VARIANT, name, reservation_seconds=60)


def claimed_ids(claims: QueueClaims, limit: int = 8) -> list[str]:
    return [record.id for record in claims.claim(limit, MODEL)]


def test_a_claim_takes_the_oldest_job_and_the_next_ones_of_its_group(job_store: JobStore) -> None:
    ids = [queue_job(job_store, duration) for duration in (2.0, 1.0, 2.0, 2.0, 1.0, 2.0)]
    ids.append(queue_job(job_store, 2.0, num_steps=5))
    claims = worker_claims(job_store, "w1")

    assert claimed_ids(claims, limit=3) == [ids[0], ids[2], ids[3]]
    records = [job_store.get(job_id) for job_id in ids[:4]]
    assert [r.status for r in records] == [JobStatus.running, JobStatus.queued, JobStatus.running, JobStatus.running]
    assert {(r.worker, r.attempts) for r in records if r.status is JobStatus.running} == {("w1", 1)}
    assert sorted(job_store.running_ids()) == sorted([ids[0], ids[2], ids[3]])
    assert queue.position(job_store.redis, VARIANT, ids[1], 1, scan=10) == 1
    assert not job_store.redis.exists(queue.RQ_JOB_PREFIX + queue.rq_job_id(ids[0], 1))

    # a canceled job's entry is stale: dropped, never claimed
    job_store.finish(job_store.get(ids[4]), (JobStatus.queued,), JobStatus.canceled)
    assert claimed_ids(claims) == [ids[1]]
    assert claimed_ids(claims) == [ids[5]]  # the step count is part of the group
    assert claimed_ids(claims) == [ids[6]]
    assert claimed_ids(claims) == [] and queue.depth(job_store.redis, VARIANT) == 0


def test_a_queued_job_past_its_deadline_is_never_reserved_nor_started(job_store: JobStore) -> None:
    overdue = queue_job(job_store, 1.0, deadline=time.time() - 0.1)
    later = queue_job(job_store, 1.0, deadline=time.time() + 3600)
    claims = worker_claims(job_store, "w1")
    entry = queue.rq_job_id(later, 1)
    assert claims.reserve(8) == [entry]
    assert claimed_ids(claims) == [later]
    record = job_store.get(overdue)
    assert record.status is JobStatus.canceled and record.started_at is None and record.attempts == 0
    assert record.error["type"] == "urn:mmaudio:problem:deadline-exceeded"
    assert queue.depth(job_store.redis, VARIANT) == 0
    assert job_store.redis.zscore(keys.DEADLINES, overdue) is None


def test_a_batch_holds_at_most_max_batch_samples_but_always_the_oldest_job(job_store: JobStore) -> None:
    ids = [queue_job(job_store, 1.0, num_samples=samples) for samples in (3, 4, 2, 1, 8, 2)]
    claims = worker_claims(job_store, "w1")
    assert claimed_ids(claims, limit=6) == [ids[0], ids[2], ids[3]]  # 3 + 2 + 1 samples; 4 more would not fit
    assert claimed_ids(claims, limit=6) == [ids[1], ids[5]]
    assert claimed_ids(claims, limit=6) == [ids[4]]  # larger than a batch: runs alone


def test_concurrent_claims_never_share_a_job(job_store: JobStore) -> None:
    ids = {queue_job(job_store, (1.0, 1.5)[i % 2]) for i in range(60)}
    taken: dict[str, list[str]] = {}

    def drain(name: str) -> None:
        claims = worker_claims(job_store, name)
        taken[name] = []
        while batch := claimed_ids(claims, limit=3):
            taken[name] += batch

    threads = [threading.Thread(target=drain, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = [job_id for batch in taken.values() for job_id in batch]
    assert len(everything) == len(set(everything)) == len(ids) and set(everything) == ids


def test_reservations_steer_busy_workers_and_never_hold_back_an_idle_one(job_store: JobStore) -> None:
    ids = [queue_job(job_store, duration) for duration in (1.0, 1.0, 2.0, 1.0)]
    first, second, idle = (worker_claims(job_store, name) for name in ("w1", "w2", "w3"))
    entry = {job_id: queue.rq_job_id(job_id, 1) for job_id in ids}

    assert first.reserve(2) == [entry[ids[0]], entry[ids[1]]]
    assert second.reserve(8) == [entry[ids[2]]]  # past the first worker's reservation, to the next group
    assert job_store.get(ids[0]).status is JobStatus.queued  # reserved jobs stay queued
    assert claimed_ids(second) == [ids[2]]  # its own reservation first
    assert claimed_ids(idle, limit=2) == [ids[0], ids[1]]  # an idle worker takes the oldest, reserved or not
    assert first.reserve(8) == [entry[ids[3]]]  # the first worker's reservation moved on

    heartbeats.forget(job_store.redis, "w1")  # dead: its reservation counts for nothing
    assert second.reserve(8) == [entry[ids[3]]]
    second.release()
    assert not job_store.redis.exists(queue.RESERVATION_PREFIX + ids[3])


def with_settings(jobs: JobStore, **settings: object) -> JobStore:
    return JobStore(jobs.redis, Settings(_env_file=None, variant=VARIANT, **settings), jobs.store)


def test_a_claim_looks_only_at_the_window_at_the_head(job_store: JobStore) -> None:
    ids = [queue_job(job_store, duration) for duration in (1.0, 2.0, 2.0, 1.0, 1.0)]
    claims = worker_claims(with_settings(job_store, claim_window=3), "w1")
    assert claimed_ids(claims) == [ids[0]]  # the other 1.0 s jobs lie beyond the window
    assert claimed_ids(claims) == [ids[1], ids[2]]
    assert claimed_ids(claims) == [ids[3], ids[4]]


def test_stale_entries_are_cleaned_a_window_at_a_time_until_a_job_is_found(job_store: JobStore) -> None:
    ids = [queue_job(job_store, 1.0) for _ in range(12)]
    for job_id in ids[:10]:  # canceled without withdrawing their entries: ten stale entries at the head
        job_store.finish(job_store.get(job_id), (JobStatus.queued,), JobStatus.canceled)
    redis = job_store.redis
    claims = worker_claims(with_settings(job_store, claim_window=4), "w1")
    assert claimed_ids(claims, limit=1) == [ids[10]]
    assert queue.depth(redis, VARIANT) == 1
    assert not any(redis.exists(queue.RQ_JOB_PREFIX + queue.rq_job_id(job_id, 1)) for job_id in ids[:11])
    assert redis.ttl(queue.RQ_JOB_PREFIX + queue.rq_job_id(ids[11], 1)) > 0  # expires with its job


def test_queue_position_is_exact_near_the_head_and_estimated_from_arrival_order_behind(job_store: JobStore) -> None:
    jobs = with_settings(job_store, queue_position_scan=2)
    ids = [queue_job(jobs, 1.0) for _ in range(6)]
    assert [jobs.queue_place(jobs.get(job_id)).position for job_id in ids] == [1, 2, 3, 4, 5, 6]
    jobs.cancel(jobs.get(ids[1]))  # ahead of the later jobs: they all move up
    assert [jobs.queue_place(jobs.get(job_id)).position for job_id in ids[2:]] == [2, 3, 4, 5]
    jobs.cancel(jobs.get(ids[4]))  # behind ids[3]: its estimate (2 jobs arrived after it) errs low by one
    assert [jobs.queue_place(jobs.get(job_id)).position for job_id in (ids[3], ids[5])] == [3, 4]
    assert jobs.queue_place(jobs.get(ids[1])) is None


def test_estimated_start_follows_position_per_job_time_and_live_workers(job_store: JobStore) -> None:
    ids = [queue_job(job_store, 1.0) for _ in range(3)]
    redis = job_store.redis
    assert job_store.queue_place(job_store.get(ids[2])).estimated_start_at is None  # no worker serves the variant
    for name in ("w1", "w2"):
        heartbeats.beat(redis, name, {"name": name, "variant": VARIANT, "ready": True}, ttl_seconds=60)
    redis.hset(keys.JOB_SECONDS, VARIANT, 8.0)  # no claims measured yet: 8 s a job over 2 workers
    before = time.time()
    place = job_store.queue_place(job_store.get(ids[2]))
    assert place.position == 3 and before + 12 <= place.estimated_start_at <= time.time() + 12
    now = time.time()  # measured: 10 claims over the last 20 s, one job start every 2 s
    redis.zadd(keys.claims(VARIANT), {f"done{i}": now - 20 + 2 * i for i in range(10)})
    assert job_store.queue_place(job_store.get(ids[0])).estimated_start_at == pytest.approx(time.time() + 2, abs=0.5)


def test_a_failed_shared_pass_runs_each_job_alone(job_store: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch that fails as a whole (out of GPU memory at that size, injected here: the tiny model fits
    anywhere) costs no job its result: each job gets a pass of its own, and only one that fails alone too
    ends as failed."""
    ids = [queue_job(job_store, 1.0, prompt=prompt) for prompt in ("rain", "thunder", "wind")]
    pipeline = tiny_pipeline(VARIANT)
    generate = pipeline.generate_prepared
    passes: list[list[str]] = []

    def fails_in_batches(prepared: list[PreparedRequest], progress: ProgressCallback | None = None) -> list:
        passes.append([p.request.prompt for p in prepared])
        if len(prepared) > 1:
            raise torch.OutOfMemoryError("injected: no room for a batch of this size")
        if prepared[0].request.prompt == "thunder":
            raise RuntimeError("injected: this job fails on its own too")
        return generate(prepared, progress)

    monkeypatch.setattr(pipeline, "generate_prepared", fails_in_batches)
    executor = JobExecutor(job_store.redis, job_store, job_store.store, pipeline, "w1")
    records = worker_claims(job_store, "w1").claim(8, executor.model_info())
    assert [record.id for record in records] == ids
    executor.finish(*executor.run(records, {}))

    assert passes == [["rain", "thunder", "wind"], ["rain"], ["thunder"], ["wind"]]
    rain, thunder, wind = (job_store.get(job_id) for job_id in ids)
    assert rain.status is wind.status is JobStatus.succeeded and rain.timings["batch_size"] == 1
    assert thunder.status is JobStatus.failed and "fails on its own" in thunder.error["detail"]
    assert job_store.store.size(result_name(wind.id, 0, "flac")) == wind.result.sizes["0.flac"] > 0
    assert not executor.held_jobs() and not job_store.running_ids()


# --- end to end ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batch_stack(redis_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """small_16k, tiny weights, no API keys, one worker (batches of up to 8 by default)."""
    stack = make_stack(redis_server, tmp_path_factory.mktemp("batching"), "batching", 3, BATCH_SETTINGS)
    with stack.running(1):
        yield stack


@pytest.fixture
def client(batch_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=batch_stack.url, timeout=CLIENT_TIMEOUT) as session:
        yield session


def submit(client: httpx.Client, params: dict, video: Path | None = None) -> dict:
    if video is None:
        response = client.post("/v1/jobs", json=params)
    else:
        with video.open("rb") as handle:
            response = client.post("/v1/jobs", data=form(params), files={"video": handle})
    assert response.status_code == 202, response.text
    return response.json()


def cancel(client: httpx.Client, job: dict) -> None:
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code in (200, 202)


def occupy(client: httpx.Client) -> dict:
    """A job that keeps the worker busy until canceled: what is submitted meanwhile queues up."""
    blocker = submit(client, LONG)
    wait_for_sampling(client, blocker["id"])
    return blocker


def release(client: httpx.Client, blocker: dict) -> None:
    cancel(client, blocker)
    wait_for_status(client, blocker["id"], {"canceled"}, timeout=60)


def live_worker(stack: Stack) -> dict:
    """Heartbeat info of the stack's one live worker."""
    redis = Redis.from_url(stack.env["MMAUDIO_REDIS_URL"])
    infos = [json.loads(value) for value in redis.mget(redis.keys(keys.worker("*"))) if value]
    assert len(infos) == 1, infos
    return infos[0]


def wait_until_prepared_ahead(stack: Stack, jobs: list[dict]) -> None:
    ids = {job["id"] for job in jobs}
    wait_until(lambda: ids <= set(live_worker(stack)["ahead"]), 120, "the worker to decode the queued jobs ahead")


def finished(client: httpx.Client, jobs: list[dict]) -> list[dict]:
    done = [wait_for_status(client, job["id"], {"succeeded", "failed", "canceled"}) for job in jobs]
    for job in done:
        assert job["status"] == "succeeded", job["error"]
    return done


def unix_time(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp).timestamp()


def samples(client: httpx.Client, job: dict, sample: int) -> np.ndarray:
    """A job's audio from its lossless (16-bit FLAC) master, as floats."""
    response = client.get(f"{job['links']['self']}/result", params={"format": "flac", "sample": sample})
    assert response.status_code == 200
    with av.open(io.BytesIO(response.content)) as container:
        frames = [frame.to_ndarray() for frame in container.decode(container.streams.audio[0])]
    return np.concatenate(frames, axis=-1).astype(np.float64) / 32768


def test_queued_jobs_run_as_one_batch_and_each_matches_its_solo_run(
    batch_stack: Stack, client: httpx.Client, media: Media
) -> None:
    requests = [
        ({"prompt": "rain", "seed": 11, **SHORT}, None),
        ({"prompt": "a dog barks", "seed": 12, "cfg_strength": 3.0, **SHORT}, None),
        ({"prompt": "", "seed": 13, "num_samples": 2, **SHORT}, None),
        ({"prompt": "waves", "seed": 14, **SHORT}, media.video),  # 1.6 s video cut to the 1 s asked for
    ]
    blocker = occupy(client)
    jobs = [submit(client, params, video) for params, video in requests]
    for position, job in enumerate(jobs, 1):
        queued = client.get(f"/v1/jobs/{job['id']}").json()
        assert queued["status"] == "queued" and queued["queue_position"] == position
        assert unix_time(queued["estimated_start_at"]) > time.time()  # a live worker serves the variant
    wait_until_prepared_ahead(batch_stack, jobs)
    release(client, blocker)

    batched = finished(client, jobs)
    assert [job["timings"]["batch_size"] for job in batched] == [4] * 4
    assert all(job["timings"]["prepared_ahead"] for job in batched)
    assert len({job["started_at"] for job in batched}) == 1 and len({job["worker"] for job in batched}) == 1
    assert batched[3]["result"]["formats"][0] == "mp4" and batched[2]["result"]["num_samples"] == 2

    for (params, video), job in zip(requests, batched, strict=True):
        alone = finished(client, [submit(client, params, video)])[0]
        assert alone["timings"]["batch_size"] == 1
        for sample in range(params.get("num_samples", 1)):
            difference = np.abs(samples(client, job, sample) - samples(client, alone, sample)).max()
            assert difference <= 1e-4, (params, sample, difference)


def test_canceling_one_job_of_a_running_batch_cancels_only_it(client: httpx.Client) -> None:
    blocker = occupy(client)
    jobs = [submit(client, {"seed": seed, "duration": 1.0, "num_steps": 100}) for seed in (1, 2, 3)]
    release(client, blocker)
    wait_for_sampling(client, jobs[1]["id"])
    cancel(client, jobs[1])

    canceled = wait_for_status(client, jobs[1]["id"], {"canceled", "succeeded", "failed"}, timeout=CANCEL_SECONDS)
    assert canceled["status"] == "canceled" and canceled["result"] is None
    others = finished(client, [jobs[0], jobs[2]])
    assert [job["timings"]["batch_size"] for job in others] == [3, 3]
    assert canceled["started_at"] == others[0]["started_at"] == others[1]["started_at"]


def test_a_batch_stops_once_every_job_in_it_is_canceled(client: httpx.Client) -> None:
    blocker = occupy(client)
    jobs = [submit(client, LONG) for _ in range(2)]
    release(client, blocker)
    for job in jobs:
        wait_for_sampling(client, job["id"])
    cancel(client, jobs[0])
    wait_for_status(client, jobs[0]["id"], {"canceled"}, timeout=CANCEL_SECONDS)
    fraction = progress(client, jobs[1])
    wait_until(lambda: progress(client, jobs[1]) > fraction, CANCEL_SECONDS, "the other job to keep sampling")

    cancel(client, jobs[1])
    canceled_at = time.time()
    assert wait_for_status(client, jobs[1]["id"], {"canceled", "succeeded", "failed"})["status"] == "canceled"
    next_job = finished(client, [submit(client, SHORT)])[0]
    assert unix_time(next_job["started_at"]) - canceled_at < CANCEL_SECONDS  # not after the 1000 steps


def progress(client: httpx.Client, job: dict) -> float:
    return client.get(f"/v1/jobs/{job['id']}").json()["progress"]["fraction"]


def test_jobs_of_different_durations_are_not_mixed(client: httpx.Client) -> None:
    blocker = occupy(client)
    durations = (1.0, 1.5, 1.0, 1.5, 1.0)
    jobs = [submit(client, {**SHORT, "duration": duration}) for duration in durations]
    release(client, blocker)
    done = finished(client, jobs)

    started: dict[float, set[float]] = {}
    for job in done:
        started.setdefault(unix_time(job["started_at"]), set()).add(job["params"]["duration"])
        assert job["timings"]["batch_size"] == durations.count(job["params"]["duration"])
        assert job["result"]["duration"] == job["params"]["duration"]
    assert [started[start] for start in sorted(started)] == [{1.0}, {1.5}]  # the oldest job's group first


def test_sigkill_mid_batch_fails_every_job_of_the_batch(batch_stack: Stack, client: httpx.Client) -> None:
    blocker = occupy(client)
    batch = [submit(client, LONG) for _ in range(3)]
    release(client, blocker)
    for job in batch:
        wait_for_sampling(client, job["id"])
    waiting = submit(client, SHORT)  # queued (and reserved) behind the running batch
    ids = sorted(job["id"] for job in batch)
    wait_until(lambda: live_worker(batch_stack)["jobs"] == ids, 30, "the heartbeat to list the batch")

    worker = batch_stack.workers[-1]
    worker.popen.send_signal(signal.SIGKILL)
    worker.popen.wait(10)
    for job in batch:
        lost = wait_for_status(client, job["id"], {"failed", "succeeded", "queued", "canceled"}, timeout=60)
        assert lost["status"] == "failed" and lost["error"]["type"] == "urn:mmaudio:problem:worker-lost"
    assert client.get(f"/v1/jobs/{waiting['id']}").json()["status"] == "queued"

    batch_stack.start_worker({"MMAUDIO_MAX_BATCH": "1"})  # the next test runs on this one
    batch_stack.wait_for_workers(1)
    done = finished(client, [waiting])[0]
    assert done["attempts"] == 1 and done["timings"]["batch_size"] == 1


def test_max_batch_one_runs_every_job_alone(batch_stack: Stack, client: httpx.Client) -> None:
    assert live_worker(batch_stack)["pid"] == batch_stack.workers[-1].popen.pid  # started with MMAUDIO_MAX_BATCH=1
    blocker = occupy(client)
    jobs = [submit(client, {**SHORT, "seed": seed}) for seed in (1, 2, 3)]
    wait_until_prepared_ahead(batch_stack, jobs[:1])  # one job ahead, not a batch
    assert set(live_worker(batch_stack)["ahead"]) == {jobs[0]["id"]}
    release(client, blocker)
    done = finished(client, jobs)
    assert [job["timings"]["batch_size"] for job in done] == [1, 1, 1]
    assert len({job["started_at"] for job in done}) == 3
