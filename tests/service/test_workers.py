"""Workers: resident (no fork per job), several on one queue, and what happens when one is SIGKILLed."""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from service_harness import (
    CLIENT_TIMEOUT,
    MAIN_SETTINGS,
    QUICK,
    SLOW,
    WAIT,
    Process,
    Stack,
    child_pids,
    form,
    make_stack,
    wait_for_sampling,
    wait_for_status,
    wait_until,
)

from model.testkit import make_video

CRASH_SETTINGS = {
    key: MAIN_SETTINGS[key]
    for key in (
        "MMAUDIO_WEIGHTS",
        "MMAUDIO_MAX_NUM_STEPS",
        "MMAUDIO_WORKER_HEARTBEAT_SECONDS",
        "MMAUDIO_WORKER_TTL_SECONDS",
        "MMAUDIO_MAINTENANCE_INTERVAL_SECONDS",
    )
}
CRASH_JOB_TIMEOUT = 30  # seconds: an OVERRUN job overruns it, a QUICK one does not
OVERRUN = {"duration": 8.0, "num_steps": 5000}  # minutes of sampling on any machine (the tiny model is fast)


def test_health_readiness_and_metrics(stack: Stack, alice: httpx.Client) -> None:
    assert httpx.get(f"{stack.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{stack.url}/readyz").json()
    assert ready["status"] == "ready" and ready["workers"] >= 1 and ready["variants"] == ["large_44k_v2"]
    alice.post("/v1/jobs", json=QUICK, headers=WAIT)
    text = httpx.get(f"{stack.url}/metrics").text
    assert re.search(r'^mmaudio_jobs_total\{status="succeeded"\} [1-9]', text, re.M)
    assert re.search(r'^mmaudio_queue_depth\{variant="large_44k_v2"\} \d', text, re.M)
    assert re.search(r'^mmaudio_workers\{variant="large_44k_v2"\} [1-9]', text, re.M)
    assert re.search(r'^mmaudio_queue_wait_seconds\{variant="large_44k_v2"\} [0-9.e+-]+$', text, re.M)
    assert 'mmaudio_queue_wait_seconds{variant="small_16k"}' not in text  # no worker serves it: no estimate
    assert re.search(r'^mmaudio_jobs_current\{status="running"\} \d', text, re.M)
    for stage in ("queue", "sampling", "encode", "total"):
        assert re.search(rf'^mmaudio_stage_duration_seconds_count\{{stage="{stage}"\}} [1-9]', text, re.M), stage
    docs = httpx.get(f"{stack.url}/openapi.json").json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}/result", "/readyz"} <= set(docs["paths"])
    assert httpx.get(f"{stack.url}/docs").status_code == 200


def test_worker_runs_jobs_in_its_own_process(stack: Stack, alice: httpx.Client) -> None:
    worker = stack.workers[0]
    job = alice.post("/v1/jobs", json=SLOW).json()
    running = wait_for_sampling(alice, job["id"])
    assert child_pids(worker.popen.pid) == []
    assert running["worker"].split("-")[-2] == str(worker.popen.pid)
    alice.post(f"/v1/jobs/{job['id']}/cancel")
    wait_for_status(alice, job["id"], {"canceled"})


def test_two_workers_share_one_queue(stack: Stack, alice: httpx.Client) -> None:
    second = stack.start_worker()
    try:
        stack.wait_for_workers(2)
        jobs = [alice.post("/v1/jobs", json=QUICK).json() for _ in range(4)]
        done = [wait_for_status(alice, job["id"], {"succeeded", "failed"}) for job in jobs]
        assert [job["status"] for job in done] == ["succeeded"] * 4
        assert len({job["worker"] for job in done}) == 2
    finally:
        second.stop()
        stack.workers.remove(second)
    wait_until(lambda: stack.ready_workers() == 1, 30, "the second worker to leave")


@pytest.fixture(scope="module")
def crash_stack(redis_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """No API keys, results on the filesystem, short job timeout, abandoned jobs fail (the default)."""
    folder = tmp_path_factory.mktemp("crash")
    settings = CRASH_SETTINGS | {
        "MMAUDIO_STORAGE": "filesystem",
        "MMAUDIO_STORAGE_DIR": str(folder / "store"),
        "MMAUDIO_JOB_TIMEOUT_SECONDS": str(CRASH_JOB_TIMEOUT),
        "MMAUDIO_MAX_NUM_STEPS": str(OVERRUN["num_steps"]),
    }
    with make_stack(redis_server, folder, "crash", 1, settings).running() as crash:
        yield crash


def kill(worker: Process) -> None:
    worker.popen.send_signal(signal.SIGKILL)
    worker.popen.wait(10)


def test_sigkilled_worker_fails_its_job_and_the_next_job_runs(crash_stack: Stack, tmp_path: Path) -> None:
    client = httpx.Client(base_url=crash_stack.url, timeout=CLIENT_TIMEOUT)
    worker = crash_stack.start_worker()
    crash_stack.wait_for_workers(1)
    video = make_video(tmp_path / "run.mp4", seconds=2.0, size=(160, 120))
    with video.open("rb") as handle:
        job = client.post("/v1/jobs", data=form(SLOW), files={"video": handle}).json()
    uploads = Path(crash_stack.env["MMAUDIO_STORAGE_DIR"]) / "uploads"
    assert (uploads / job["id"]).is_file()
    wait_for_sampling(client, job["id"])

    kill(worker)
    failed = wait_for_status(client, job["id"], {"failed", "succeeded", "queued"}, timeout=60)
    assert failed["status"] == "failed"
    assert failed["error"]["type"] == "urn:mmaudio:problem:worker-lost"
    assert worker.name and failed["worker"] in failed["error"]["detail"]
    assert not (uploads / job["id"]).exists()
    not_ready = httpx.get(f"{crash_stack.url}/readyz")
    assert not_ready.status_code == 503
    assert not_ready.json()["type"] == "urn:mmaudio:problem:service-unavailable"

    crash_stack.start_worker()
    crash_stack.wait_for_workers(1)
    with video.open("rb") as handle:
        response = client.post("/v1/jobs", data=form(QUICK), files={"video": handle})
    after = wait_for_status(client, response.json()["id"], {"succeeded", "failed"})
    assert after["status"] == "succeeded", after["error"]
    assert client.get(after["links"]["result"]).headers["content-type"] == "video/mp4"
    results = Path(crash_stack.env["MMAUDIO_STORAGE_DIR"]) / "results" / after["id"]
    assert sorted(path.name for path in results.iterdir()) == ["0.flac", "0.mp4"]


@pytest.fixture(scope="module")
def retry_stack(redis_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Abandoned jobs are queued once more."""
    retry = make_stack(
        redis_server,
        tmp_path_factory.mktemp("retry"),
        "retry",
        2,
        CRASH_SETTINGS | {"MMAUDIO_RETRY_ABANDONED_JOBS": "true"},
    )
    with retry.running():
        yield retry


def test_sigkilled_worker_job_is_retried_once(retry_stack: Stack) -> None:
    client = httpx.Client(base_url=retry_stack.url, timeout=CLIENT_TIMEOUT)
    first = retry_stack.start_worker()
    retry_stack.wait_for_workers(1)
    job = client.post("/v1/jobs", json={"duration": 1.0, "num_steps": 20}).json()
    wait_for_sampling(client, job["id"])
    kill(first)
    requeued = wait_for_status(client, job["id"], {"queued", "failed"}, timeout=60)
    assert requeued["status"] == "queued" and requeued["attempts"] == 1 and requeued["queue_position"] == 1

    second = retry_stack.start_worker()
    retry_stack.wait_for_workers(1)
    done = wait_for_status(client, job["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded" and done["attempts"] == 2

    # killed again on its second attempt: no third one
    again = client.post("/v1/jobs", json=SLOW).json()
    wait_for_sampling(client, again["id"])
    kill(second)
    wait_for_status(client, again["id"], {"queued"}, timeout=60)
    third = retry_stack.start_worker()
    retry_stack.wait_for_workers(1)
    wait_for_sampling(client, again["id"])
    kill(third)
    final = wait_for_status(client, again["id"], {"failed"}, timeout=60)
    assert final["attempts"] == 2 and final["error"]["type"] == "urn:mmaudio:problem:worker-lost"


def test_job_running_past_the_timeout_fails(crash_stack: Stack) -> None:
    client = httpx.Client(base_url=crash_stack.url, timeout=CLIENT_TIMEOUT)
    if crash_stack.ready_workers() == 0:
        crash_stack.start_worker()
        crash_stack.wait_for_workers(1)
    job = client.post("/v1/jobs", json=OVERRUN).json()
    started = wait_for_sampling(client, job["id"])
    failed = wait_for_status(client, job["id"], {"failed", "succeeded"})
    assert failed["status"] == "failed" and failed["error"]["type"] == "urn:mmaudio:problem:timeout"
    assert started["started_at"] == failed["started_at"]
    after = client.post("/v1/jobs", json=QUICK, headers=WAIT).json()
    assert after["status"] == "succeeded"
