"""A stock `rq worker` on our queue: it runs each job through our job states with a resident pipeline, and
leaves alone the entries that are not its to run (canceled, claimed by a batching worker, an older attempt)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis import Redis
from service_harness import (
    CLIENT_TIMEOUT,
    JOB_TIMEOUT,
    MAIN_SETTINGS,
    QUICK,
    REPO,
    START_TIMEOUT,
    Stack,
    form,
    make_stack,
    wait_for_status,
)

from model.testkit import make_video
from service import heartbeats, keys, queue
from service.jobs import JobStore
from service.settings import Settings
from service.storage import RedisStore
from service.worker.claims import QueueClaims

VARIANT = MAIN_SETTINGS["MMAUDIO_VARIANT"]
OTHER_VARIANT = "small_16k"
RQ_SETTINGS = {
    key: MAIN_SETTINGS[key]
    for key in (
        "MMAUDIO_WEIGHTS",
        "MMAUDIO_VARIANT",
        "MMAUDIO_VARIANTS",  # small_16k: a variant the RQ workers of the tests do not load
        "MMAUDIO_WORKER_HEARTBEAT_SECONDS",
        "MMAUDIO_WORKER_TTL_SECONDS",
        "MMAUDIO_MAINTENANCE_INTERVAL_SECONDS",
    )
} | {"MMAUDIO_RETRY_ABANDONED_JOBS": "true"}
RQ_DATABASE = 4
BATCHING_WORKER = "batching-worker-of-the-test"  # claims with our claim script, beats a heartbeat
GHOST_WORKER = "ghost-worker-of-the-test"  # claims and never beats: the reaper queues its job again


@pytest.fixture(scope="module")
def rq_stack(redis_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The API alone (no batching worker) on an empty database; RQ workers are started by the tests."""
    stack = make_stack(redis_server, tmp_path_factory.mktemp("rq"), "rq", RQ_DATABASE, RQ_SETTINGS)
    Redis.from_url(stack.env["MMAUDIO_REDIS_URL"]).flushdb()  # a queue counted by the tests holds only theirs
    with stack.running():
        yield stack


@pytest.fixture
def client(rq_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=rq_stack.url, timeout=CLIENT_TIMEOUT) as http:
        yield http


@pytest.fixture
def redis(rq_stack: Stack) -> Iterator[Redis]:
    connection = Redis.from_url(rq_stack.env["MMAUDIO_REDIS_URL"])
    yield connection
    connection.close()


def job_store(redis: Redis) -> JobStore:
    return JobStore(redis, Settings(_env_file=None), RedisStore(redis))


def run_rq_worker(stack: Stack, variant: str = VARIANT) -> str:
    """The README's command on ``variant``'s queue, in burst mode: runs every entry of the queue, then exits.
    Returns its log."""
    command = [
        str(Path(sys.executable).with_name("rq")),
        "worker",
        "--burst",
        "--worker-class",
        "rq.SimpleWorker",
        "--serializer",
        "rq.serializers.JSONSerializer",
        "--url",
        stack.env["MMAUDIO_REDIS_URL"],
        keys.queue_name(variant),
    ]
    done = subprocess.run(
        command, cwd=REPO, env=stack.env, capture_output=True, text=True, timeout=START_TIMEOUT + JOB_TIMEOUT
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def assert_rq_registries_empty(redis: Redis) -> None:
    rq_queue = queue.rq_queue(redis, VARIANT)  # nothing queued, running or failed
    assert rq_queue.count == 0
    assert rq_queue.started_job_registry.count == 0
    assert rq_queue.failed_job_registry.count == 0


def test_stock_rq_worker_runs_jobs_with_one_resident_pipeline(
    rq_stack: Stack, client: httpx.Client, redis: Redis, tmp_path: Path
) -> None:
    text = client.post("/v1/jobs", json=QUICK).json()
    video = make_video(tmp_path / "clip.mp4", seconds=1.2, size=(160, 120))
    with video.open("rb") as handle:
        muxed = client.post("/v1/jobs", data=form(QUICK), files={"video": handle}).json()
    assert [text["status"], muxed["status"]] == ["queued", "queued"]
    assert queue.rq_queue(redis, VARIANT).count == 2  # what `rq info` shows

    log = run_rq_worker(rq_stack)

    done = [client.get(f"/v1/jobs/{job['id']}").json() for job in (text, muxed)]
    for job in done:
        assert job["status"] == "succeeded", job["error"]
        assert f"Job OK ({queue.rq_job_id(job['id'], 1)})" in log
        assert job["attempts"] == 1 and job["model"]["weights"]["kind"] == "tiny"
        assert job["timings"]["batch_size"] == 1
    assert done[0]["worker"] == done[1]["worker"] and "-rq" in done[0]["worker"]  # loaded once, for both
    audio = client.get(done[0]["links"]["result"])
    assert audio.status_code == 200 and audio.content.startswith(b"fLaC")
    movie = client.get(done[1]["links"]["result"])
    assert movie.status_code == 200 and movie.headers["content-type"] == "video/mp4"
    assert_rq_registries_empty(redis)


def revision(redis: Redis, job_id: str) -> int:
    return int(redis.hget(keys.job(job_id), "revision") or 0)


def test_rq_task_leaves_alone_entries_not_its_to_run(rq_stack: Stack, client: httpx.Client, redis: Redis) -> None:
    claimed = client.post("/v1/jobs", json=QUICK).json()
    model = claimed["model"]  # a claim records the worker's loaded model; the one the API announced will do
    heartbeats.beat(redis, BATCHING_WORKER, {"name": BATCHING_WORKER, "variant": VARIANT, "ready": False}, 600)
    try:
        batching = QueueClaims(job_store(redis), VARIANT, BATCHING_WORKER, 1)
        assert [job.id for job in batching.claim(1, model)] == [claimed["id"]]
        retried = client.post("/v1/jobs", json=QUICK).json()
        ghost = QueueClaims(job_store(redis), VARIANT, GHOST_WORKER, 1)
        assert [job.id for job in ghost.claim(1, model)] == [retried["id"]]
        requeued = wait_for_status(client, retried["id"], {"queued"}, timeout=30)
        assert requeued["attempts"] == 1  # its second attempt is queued
        canceled = client.post("/v1/jobs", json=QUICK).json()
        assert client.post(f"/v1/jobs/{canceled['id']}/cancel").json()["status"] == "canceled"
        # Entries an RQ worker may hold when it runs them: taken off the queue before the cancel or the
        # batching worker's claim, and the first attempt of the job queued again.
        for job_id in (canceled["id"], claimed["id"], retried["id"]):
            queue.enqueue(redis, VARIANT, job_id, 1, 60, 3600)
        before = {job_id: revision(redis, job_id) for job_id in (canceled["id"], claimed["id"])}

        log = run_rq_worker(rq_stack)

        for job_id in (canceled["id"], claimed["id"]):
            assert f"Job OK ({queue.rq_job_id(job_id, 1)})" in log
        assert {job_id: revision(redis, job_id) for job_id in before} == before
        assert client.get(f"/v1/jobs/{canceled['id']}").json()["status"] == "canceled"
        still = client.get(f"/v1/jobs/{claimed['id']}").json()
        assert (still["status"], still["worker"], still["attempts"]) == ("running", BATCHING_WORKER, 1)
        second = client.get(f"/v1/jobs/{retried['id']}").json()
        assert (second["status"], second["attempts"]) == ("succeeded", 2)
        assert f"Job OK ({queue.rq_job_id(retried['id'], 1)})" in log
        assert f"Job OK ({queue.rq_job_id(retried['id'], 2)})" in log
        assert_rq_registries_empty(redis)
    finally:
        client.post(f"/v1/jobs/{claimed['id']}/cancel")
        heartbeats.forget(redis, BATCHING_WORKER)  # the reaper ends the claimed job as canceled


def test_rq_worker_on_another_variants_queue_gives_the_entry_back_and_stops(
    rq_stack: Stack, client: httpx.Client, redis: Redis
) -> None:
    job = client.post("/v1/jobs", json=QUICK | {"variant": OTHER_VARIANT}).json()
    try:
        log = run_rq_worker(rq_stack, OTHER_VARIANT)  # returns: the worker stopped after the first try

        assert "WrongQueue" in log
        after = client.get(f"/v1/jobs/{job['id']}").json()
        assert (after["status"], after["queue_position"], after["attempts"]) == ("queued", 1, 0)
        other = queue.rq_queue(redis, OTHER_VARIANT)
        assert other.count == 1 and other.failed_job_registry.count == 1  # what `rq info` shows
    finally:
        client.post(f"/v1/jobs/{job['id']}/cancel")
