"""Fault injection against real processes: Redis SIGKILLed and restarted from its append-only file mid-run,
worker, API and launcher SIGKILLs, a crash-looping worker. No job is lost or stuck, the API answers the right
codes meanwhile, and each recovery time is printed (`recovery: X.XX s - what`; a summary at the end of the
module, which bench/faults.py collects). Times are printed, never asserted beyond generous bounds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
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
    WAIT,
    Process,
    Stack,
    child_pids,
    make_stack,
    start_redis,
    wait_for_sampling,
    wait_for_status,
    wait_until,
)
from test_batching import MODEL, VARIANT, queue_job
from test_errors import assert_problem
from test_serve import serve_env

from model.testkit import free_port
from service import heartbeats, keys
from service.jobs import JobStore
from service.schemas import JobStatus
from service.settings import Settings
from service.storage import RedisStore
from service.upkeep.maintenance import Maintenance
from service.upkeep.webhooks import WebhookSender
from service.worker.claims import QueueClaims
from service.worker.outages import REDIS_DOWN, BestEffort, persist

ENDED = {"succeeded", "failed", "canceled"}
RETRY_AFTER = "3"
OUTAGE_SECONDS = 4.0  # how long Redis stays down: several heartbeat TTLs of the test settings
FAULT_SETTINGS = {
    **MAIN_SETTINGS,
    "MMAUDIO_API_KEYS": "",
    "MMAUDIO_MAX_QUEUE": "20",
    "MMAUDIO_UNAVAILABLE_RETRY_SECONDS": RETRY_AFTER,
    "MMAUDIO_REDIS_RECONNECT_MAX_SECONDS": "1",
}
LOAD_TIMEOUT = 3 * START_TIMEOUT  # a worker loads in seconds on an idle machine, in minutes on a crowded one
RUNNING = {"duration": 1.0, "num_steps": 40}  # caught mid-sampling; done in seconds on an idle machine
RECOVERIES: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def recovery_summary() -> Iterator[None]:
    yield
    if RECOVERIES:
        print("\nrecovery summary: " + ", ".join(f"{what} {seconds:.2f} s" for what, seconds in RECOVERIES.items()))


def recovered(what: str, since: float) -> float:
    seconds = time.monotonic() - since
    RECOVERIES[what] = seconds
    print(f"recovery: {seconds:.2f} s - {what}")
    return seconds


def answers(url: str) -> Callable[[], bool]:
    def ok() -> bool:
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    return ok


def all_succeed(client: httpx.Client, jobs: list[dict], attempts: int | None = None) -> list[dict]:
    done = [wait_for_status(client, job["id"], ENDED) for job in jobs]
    assert [job["status"] for job in done] == ["succeeded"] * len(jobs), [job["error"] for job in done]
    if attempts is not None:
        assert [job["attempts"] for job in done] == [attempts] * len(jobs)
    return done


def test_worker_calls_wait_out_a_redis_restart(tmp_path: Path) -> None:
    port = free_port()
    redis_process = start_redis(port, tmp_path, aof=True)
    redis = Redis.from_url(f"redis://127.0.0.1:{port}")
    try:
        redis.set("kept", "1")
        redis_process.kill()
        redis_process.wait(10)
        skipped = BestEffort(0.2)
        assert skipped.call(redis.ping, "testing") is None  # at once: the caller goes on
        with pytest.raises(REDIS_DOWN):
            persist(redis.ping, "testing", 0.2, give_up_seconds=1.0)  # bounded
        answer: list[int] = []
        writer = threading.Thread(target=lambda: answer.append(persist(lambda: redis.incr("count"), "testing", 0.2)))
        writer.start()
        time.sleep(1.0)
        assert writer.is_alive()  # still trying
        redis_process = start_redis(port, tmp_path, aof=True)
        writer.join(20)
        assert answer == [1] and redis.get("kept") == b"1"  # one write, after what the AOF kept
        wait_until(lambda: skipped.call(redis.ping, "testing"), 5, "the skipped calls to resume")
    finally:
        redis_process.kill()
        redis_process.wait(10)


def test_the_reaper_gives_workers_a_heartbeat_lifetime_after_a_redis_restart(tmp_path: Path) -> None:
    port = free_port()
    redis_process = start_redis(port, tmp_path, aof=True)
    redis = Redis.from_url(f"redis://127.0.0.1:{port}")
    try:
        settings = Settings(_env_file=None, variant=VARIANT, worker_ttl_seconds=2)
        jobs = JobStore(redis, settings, RedisStore(redis))
        reaper = Maintenance(redis, jobs, jobs.store, WebhookSender(redis, settings, jobs))
        job_id = queue_job(jobs, 1.0)
        heartbeats.beat(redis, "w1", {"name": "w1"}, settings.worker_ttl_seconds)
        assert [record.id for record in QueueClaims(jobs, VARIANT, "w1", 60).claim(1, MODEL)] == [job_id]
        redis_process.kill()  # down longer than the heartbeat's TTL: its key is expired when Redis returns
        redis_process.wait(10)
        time.sleep(settings.worker_ttl_seconds + 0.5)
        redis_process = start_redis(port, tmp_path, aof=True)
        assert not heartbeats.is_alive(redis, "w1") and reaper.reap_abandoned() == []  # too soon to judge
        heartbeats.beat(redis, "w1", {"name": "w1"}, 2 * settings.worker_ttl_seconds)  # the worker is back
        time.sleep(settings.worker_ttl_seconds)
        assert reaper.reap_abandoned() == [] and jobs.get(job_id).status is JobStatus.running
        time.sleep(settings.worker_ttl_seconds + 0.5)  # its heartbeat expired with Redis up: it is dead
        assert reaper.reap_abandoned() == [job_id]
        assert jobs.get(job_id).error["type"] == "urn:mmaudio:problem:worker-lost"
    finally:
        redis_process.kill()
        redis_process.wait(10)


def test_jobs_survive_a_redis_restart_from_its_append_only_file(tmp_path: Path) -> None:
    port, folder = free_port(), tmp_path / "redis"
    folder.mkdir()
    redis_process = start_redis(port, folder, aof=True)
    stack = make_stack(f"redis://127.0.0.1:{port}", tmp_path, "aof", 0, FAULT_SETTINGS)
    try:
        with stack.running(1), httpx.Client(base_url=stack.url, timeout=CLIENT_TIMEOUT) as client:
            worker = stack.workers[0]
            running = client.post("/v1/jobs", json=RUNNING).json()
            queued = [client.post("/v1/jobs", json={**QUICK, "seed": seed}).json() for seed in range(3)]
            sampling = wait_for_sampling(client, running["id"])

            redis_process.kill()  # SIGKILL: what was acknowledged is in the append-only file, nothing more
            redis_process.wait(10)
            for response in (
                client.get(f"/v1/jobs/{running['id']}"),
                client.get("/v1/jobs"),
                client.post("/v1/jobs", json=QUICK),
            ):
                assert_problem(response, 503, "service-unavailable")
                assert response.headers["retry-after"] == RETRY_AFTER
            time.sleep(OUTAGE_SECONDS)  # the worker samples on, its writes wait
            assert worker.popen.poll() is None, worker.tail()

            redis_process = start_redis(port, folder, aof=True)  # same port, same files
            back = time.monotonic()
            wait_until(lambda: client.get(f"/v1/jobs/{running['id']}").status_code == 200, 60, "the API")
            recovered("Redis restart -> API answers 200", back)
            done = all_succeed(client, [running], attempts=1)[0]  # finished by the worker that ran it
            recovered("Redis restart -> the running job succeeded", back)
            assert done["worker"] == sampling["worker"]
            all_succeed(client, queued, attempts=1)
            recovered("Redis restart -> every queued job succeeded", back)
            all_succeed(client, [client.post("/v1/jobs", json=QUICK, headers=WAIT).json()])
            assert worker.popen.poll() is None and "Redis unreachable while" in worker.tail(400)
    finally:
        redis_process.kill()
        redis_process.wait(10)


def wait_until_loaded(redis: Redis, worker: Process) -> dict:
    """The worker's heartbeat once it says its model is loaded (and warmed up)."""

    def loaded() -> dict | None:
        if worker.popen.poll() is not None:
            raise RuntimeError(f"{worker.name} exited:\n{worker.tail()}")
        info = next((info for info in heartbeats.live_workers(redis) if info["pid"] == worker.popen.pid), None)
        return info if info and info["loaded_at"] else None

    return wait_until(loaded, LOAD_TIMEOUT, f"{worker.name} to load its model", interval=0.05)


def readyz(stack: Stack) -> int:
    return httpx.get(f"{stack.url}/readyz", timeout=5).status_code


def test_a_crash_looping_worker_never_makes_the_service_ready(redis_server: str, tmp_path: Path) -> None:
    stable = 6.0
    settings = FAULT_SETTINGS | {"MMAUDIO_WORKER_STABLE_SECONDS": str(stable)}
    stack = make_stack(redis_server, tmp_path, "crash-loop", 10, settings)
    with stack.running():
        redis = Redis.from_url(stack.env["MMAUDIO_REDIS_URL"])
        redis.flushdb()
        for _ in range(2):  # loads its model, beats, dies before it has run `stable` seconds
            worker = stack.start_worker()
            loaded = wait_until_loaded(redis, worker)
            assert not loaded["ready"] and readyz(stack) == 503
            worker.popen.send_signal(signal.SIGKILL)
            worker.popen.wait(10)
            assert time.time() - loaded["loaded_at"] < stable  # it died inside its warm-up window
            assert readyz(stack) == 503  # its last heartbeat lives on for the TTL, not ready
        time.sleep(2.5)  # past the TTL: no worker at all
        assert_problem(httpx.get(f"{stack.url}/readyz"), 503, "service-unavailable")

        healthy = stack.start_worker()
        loaded = wait_until_loaded(redis, healthy)
        wait_until(lambda: readyz(stack) == 200, 30, "the healthy worker to be ready", interval=0.05)
        assert time.time() - loaded["loaded_at"] >= stable - 0.1  # not before it has run `stable` seconds
        with httpx.Client(base_url=stack.url, timeout=CLIENT_TIMEOUT) as client:
            all_succeed(client, [client.post("/v1/jobs", json=QUICK, headers=WAIT).json()])


def role_of(pid: int) -> str:
    """`worker`, `api` or `redis` for a child of the launcher."""
    command = Path(f"/proc/{pid}/cmdline").read_bytes()
    return next(role for role, mark in (("worker", b"service.worker"), ("api", b"service.api")) if mark in command)


def children_by_role(launcher: subprocess.Popen) -> dict[str, int]:
    return {role_of(pid): pid for pid in child_pids(launcher.pid)}


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def launch(env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "service"], cwd=REPO, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT
    )


def test_killed_worker_api_and_launcher_lose_no_job(tmp_path: Path) -> None:
    redis_port, folder = free_port(), tmp_path / "redis"
    folder.mkdir()
    redis_process = start_redis(redis_port, folder, aof=True)  # outlives the launchers, as an external Redis
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = {key: FAULT_SETTINGS[key] for key in ("MMAUDIO_MAX_QUEUE", "MMAUDIO_MAX_NUM_STEPS")}
    settings |= {key: MAIN_SETTINGS[key] for key in MAIN_SETTINGS if "HEARTBEAT" in key or "TTL" in key}
    env = serve_env(
        tmp_path,
        port,
        MMAUDIO_REDIS_URL=f"redis://127.0.0.1:{redis_port}",
        MMAUDIO_RETRY_ABANDONED_JOBS="true",  # a job whose worker died runs once more
        MMAUDIO_MAINTENANCE_INTERVAL_SECONDS="0.25",
        **settings,
    )
    log = tmp_path / "serve.log"
    launcher = launch(env, log)
    client = httpx.Client(base_url=url, timeout=CLIENT_TIMEOUT)
    try:
        wait_until(answers(f"{url}/readyz"), LOAD_TIMEOUT, "the service to be ready", interval=0.25)

        # worker SIGKILL mid-job: the launcher restarts it, the reaper queues the job again, it succeeds
        running = client.post("/v1/jobs", json=RUNNING).json()
        queued = [client.post("/v1/jobs", json={**QUICK, "seed": seed}).json() for seed in range(2)]
        wait_for_sampling(client, running["id"])
        os.kill(children_by_role(launcher)["worker"], signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: client.get(f"/v1/jobs/{running['id']}").json()["status"] == "queued", 60, "the re-queue")
        recovered("worker SIGKILL -> its job re-queued", killed)
        wait_until(answers(f"{url}/readyz"), LOAD_TIMEOUT, "the restarted worker", interval=0.25)
        recovered("worker SIGKILL -> a restarted worker ready", killed)
        all_succeed(client, [running], attempts=2)
        recovered("worker SIGKILL -> its job succeeded", killed)
        all_succeed(client, queued, attempts=1)

        # API SIGKILL while a job runs: the launcher restarts the API, the job never notices
        running = client.post("/v1/jobs", json=RUNNING).json()
        wait_for_sampling(client, running["id"])
        os.kill(children_by_role(launcher)["api"], signal.SIGKILL)
        killed = time.monotonic()
        wait_until(answers(f"{url}/v1/jobs/{running['id']}"), START_TIMEOUT, "the restarted API", interval=0.05)
        recovered("API SIGKILL -> API answers 200", killed)
        all_succeed(client, [running], attempts=1)

        # launcher SIGKILL: its children die with it (the worker after storing its running job's result), the
        # queued jobs wait in Redis, and a new launcher runs them
        running = client.post("/v1/jobs", json=RUNNING).json()
        queued = [client.post("/v1/jobs", json={**QUICK, "seed": seed}).json() for seed in range(2, 4)]
        wait_for_sampling(client, running["id"])
        children = child_pids(launcher.pid)
        launcher.kill()
        launcher.wait(10)
        killed = time.monotonic()
        wait_until(lambda: not any(map(alive, children)), JOB_TIMEOUT, "the children to die")
        recovered("launcher SIGKILL -> every child gone", killed)
        redis = Redis.from_url(env["MMAUDIO_REDIS_URL"])
        statuses = [redis.hget(keys.job(job["id"]), "status") for job in [running, *queued]]
        assert statuses == [b"succeeded", b"queued", b"queued"]  # the worker finished its batch, took no more
        launcher = launch(env, log)
        wait_until(answers(f"{url}/readyz"), LOAD_TIMEOUT, "the new launcher", interval=0.25)
        recovered("launcher SIGKILL -> a new launcher ready", killed)
        all_succeed(client, [running, *queued], attempts=1)
        recovered("launcher SIGKILL -> the queued jobs succeeded", killed)
    except BaseException:
        print(log.read_text(errors="replace")[-6000:])
        raise
    finally:
        client.close()
        launcher.kill()
        launcher.wait(10)
        redis_process.kill()
        redis_process.wait(10)
