"""Long videos through the real API, queue and worker (tiny weights): the whole upload comes back with a
soundtrack of its length; durations default, shorten and are refused as documented; long jobs are claimed
alone and their timeout grows with the audio they generate."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from redis import Redis
from service_harness import CLIENT_TIMEOUT, make_stack, wait_for_status
from test_jobs import read_sse, submit_video

from model.build import tiny_pipeline
from model.testkit import audio_length, make_image, make_video, video_packets
from service import heartbeats, queue
from service.jobs import JobRecord, JobStore
from service.schemas import EffectiveParams, InputInfo, JobStatus, ModelInfo, WeightsInfo
from service.settings import Settings
from service.storage import RedisStore
from service.worker.claims import QueueClaims
from service.worker.executor import JobExecutor

VARIANT = "large_44k_v2"
STACK_DATABASE, CLAIMS_DATABASE = 12, 13
MAX_DURATION = 90.0
LONG_SETTINGS = {
    "MMAUDIO_WEIGHTS": "tiny",
    "MMAUDIO_VARIANT": VARIANT,
    "MMAUDIO_MAX_DURATION": str(MAX_DURATION),
    "MMAUDIO_MAX_VIDEO_SECONDS": "200",
}
JOB_TIMEOUT = 600.0  # a minute of tiny-weight audio takes a few minutes of this busy 2-core CPU
MODEL = ModelInfo(variant=VARIANT, weights=WeightsInfo(kind="tiny", random_weights=True))


@dataclass(frozen=True)
class Clips:
    minute: Path  # 60 s, 160x96, 25 fps, with B-frames
    short: Path  # 3 s
    over_max: Path  # 100 s: longer than MMAUDIO_MAX_DURATION, within MMAUDIO_MAX_VIDEO_SECONDS
    image: Path


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Clips:
    folder = tmp_path_factory.mktemp("long-media")
    return Clips(
        minute=make_video(folder / "minute.mp4", 60.0, 25, size=(160, 96)),
        short=make_video(folder / "short.mp4", 3.0, 25, size=(160, 96)),
        over_max=make_video(folder / "over.mp4", 100.0, 5, size=(64, 48), preset="ultrafast"),
        image=make_image(folder / "still.png", (64, 48)),
    )


@pytest.fixture(scope="module")
def client(redis_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    stack = make_stack(redis_server, tmp_path_factory.mktemp("long"), "long", STACK_DATABASE, LONG_SETTINGS)
    with stack.running(1), httpx.Client(base_url=stack.url, timeout=CLIENT_TIMEOUT) as session:
        yield session


def download(client: httpx.Client, job: dict, fmt: str, folder: Path) -> Path:
    response = client.get(f"{job['links']['self']}/result", params={"format": fmt})
    assert response.status_code == 200, response.text
    path = folder / f"{job['id']}.{fmt}"
    path.write_bytes(response.content)
    return path


def check_audio_length(client: httpx.Client, job: dict, folder: Path) -> None:
    """The flac master holds exactly the generated length; the mp4's AAC declares it (its decoder pads the
    last frame)."""
    rate, seconds = job["result"]["sample_rate"], job["result"]["duration"]
    samples = round(seconds * rate)
    assert audio_length(download(client, job, "flac", folder))[0] == samples
    if job["params"]["output_format"] == "mp4":
        decoded, declared, mp4_rate = audio_length(download(client, job, "mp4", folder))
        assert mp4_rate == rate and declared == samples / rate and samples <= decoded < samples + 1024


def test_a_minute_of_video_comes_back_whole_with_its_soundtrack(
    client: httpx.Client, clips: Clips, tmp_path: Path
) -> None:
    response = submit_video(client, clips.minute, prompt="rain on a roof", num_steps="2", seed="3")
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["params"]["requested_duration"] == "video" and job["params"]["duration"] == 60.0

    events = read_sse(client, job["links"]["events"])
    done = events[-1][2]
    assert done["status"] == "succeeded", done["error"]
    sampling = [data["progress"] for _, _, data in events if (data["progress"] or {}).get("stage") == "sampling"]
    assert sampling, [data["progress"] for _, _, data in events]
    for progress in sampling:  # "window 3/10, step 1/2"
        assert 1 <= progress["window"] <= progress["windows"] and 0 <= progress["step"] <= progress["steps"] == 2

    assert done["result"]["duration"] == pytest.approx(60.0, abs=0.05)
    # 8 s windows every 6 s: 0, 6, ..., 54 (the last one 6 s long)
    assert done["result"]["windows"] == {"count": 10, "overlap_seconds": 2.0, "schedule": "batched"}
    assert {progress["windows"] for progress in sampling} == {10}
    mp4 = download(client, done, "mp4", tmp_path)
    assert video_packets(mp4) == video_packets(clips.minute)  # every packet: same bytes, pts and dts
    check_audio_length(client, done, tmp_path)


@pytest.mark.parametrize(("asked", "requested"), [(None, "video"), ("video", "video"), ("9", 9.0)])
def test_a_short_video_gives_its_length_whatever_longer_duration_is_asked(
    client: httpx.Client, clips: Clips, tmp_path: Path, asked: str | None, requested: float | str
) -> None:
    fields = {"num_steps": "1"} | ({} if asked is None else {"duration": asked})
    response = submit_video(client, clips.short, **fields)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["params"]["requested_duration"] == requested and job["params"]["duration"] == 3.0

    done = wait_for_status(client, job["id"], {"succeeded", "failed"}, JOB_TIMEOUT)
    assert done["status"] == "succeeded", done["error"]
    assert done["result"]["duration"] == pytest.approx(3.0, abs=0.05) and done["result"]["windows"] is None
    assert video_packets(download(client, done, "mp4", tmp_path)) == video_packets(clips.short)
    check_audio_length(client, done, tmp_path)


def test_a_text_job_of_thirty_seconds(client: httpx.Client, tmp_path: Path) -> None:
    response = client.post("/v1/jobs", json={"prompt": "wind in tall grass", "duration": 30, "num_steps": 1})
    assert response.status_code == 202, response.text
    assert {"requested_duration": 30.0, "duration": 30.0}.items() <= response.json()["params"].items()
    done = wait_for_status(client, response.json()["id"], {"succeeded", "failed"}, JOB_TIMEOUT)
    assert done["status"] == "succeeded", done["error"]
    assert done["result"]["duration"] == 30.0
    check_audio_length(client, done, tmp_path)


def cancel(client: httpx.Client, job: dict) -> None:
    assert client.post(job["links"]["cancel"]).status_code in (200, 202)
    wait_for_status(client, job["id"], {"canceled", "succeeded"}, JOB_TIMEOUT)


def test_durations_default_and_are_bounded(client: httpx.Client, clips: Clips) -> None:
    text = client.post("/v1/jobs", json={"prompt": "rain", "num_steps": 1}).json()
    assert text["params"]["requested_duration"] == text["params"]["duration"] == 8.0  # no video: the default
    cancel(client, text)

    whole = submit_video(client, clips.over_max)  # the whole of 100 s, over the 90 s limit: refused, not cut
    assert whole.status_code == 422 and whole.headers["content-type"] == "application/problem+json"
    problem = whole.json()
    assert problem["type"].endswith(":media-limits") and problem["limit_seconds"] == MAX_DURATION
    assert "100.0 s" in problem["detail"] and "90" in problem["detail"]
    start = submit_video(client, clips.over_max, duration="20", num_steps="1")  # its first 20 s are fine
    assert start.status_code == 202 and start.json()["params"]["duration"] == 20.0
    cancel(client, start.json())

    refused = [
        client.post("/v1/jobs", json={"prompt": "rain", "duration": MAX_DURATION + 1}),
        submit_video(client, clips.short, duration=str(MAX_DURATION + 1)),
        client.post("/v1/jobs", json={"prompt": "rain", "duration": "video"}),
        client.post("/v1/jobs", files={"image": clips.image.open("rb")}, data={"duration": "video"}),
        client.post("/v1/jobs", json={"prompt": "rain", "duration": "whole"}),
    ]
    for response in refused:
        assert response.status_code == 422, response.text
        assert response.json()["type"].endswith(":validation-error")
        assert "duration" in response.json()["detail"]


# --- claims and timeouts, on Redis and the executor ---------------------------------------------------------------


@pytest.fixture
def job_store(redis_server: str) -> Iterator[JobStore]:
    redis = Redis.from_url(f"{redis_server}/{CLAIMS_DATABASE}")
    redis.flushdb()
    settings = Settings(_env_file=None, variant=VARIANT, job_timeout_seconds=0.5, job_seconds_per_minute=30)
    yield JobStore(redis, settings, RedisStore(redis))
    redis.flushdb()


def queue_text_job(jobs: JobStore, duration: float, num_steps: int = 1) -> JobRecord:
    params = EffectiveParams(
        prompt="",
        negative_prompt="",
        duration=duration,
        requested_duration=duration,
        num_steps=num_steps,
        cfg_strength=4.5,
        seed=1,
        mask_away_clip=False,
        num_samples=1,
        variant=VARIANT,
        output_format="flac",
    )
    record = JobRecord(str(uuid.uuid4()), "test", JobStatus.queued, time.time(), params, InputInfo(kind="text"), MODEL)
    jobs.create(record)
    return record


def claims_of(jobs: JobStore, name: str) -> QueueClaims:
    heartbeats.beat(jobs.redis, name, {"name": name}, ttl_seconds=60)
    return QueueClaims(jobs, VARIANT, name, reservation_seconds=60)


def test_a_long_job_is_claimed_and_reserved_alone(job_store: JobStore) -> None:
    long_jobs = [queue_text_job(job_store, 60.0).id for _ in range(2)]
    short_jobs = [queue_text_job(job_store, 8.0).id for _ in range(2)]
    claims = claims_of(job_store, "w1")
    assert [queue.parse_rq_job_id(entry)[0] for entry in claims.reserve(8)] == long_jobs[:1]
    batches = [[record.id for record in claims.claim(8, MODEL)] for _ in range(3)]
    assert batches == [long_jobs[:1], long_jobs[1:], short_jobs]  # 8 s jobs (one window) still batch


def test_the_job_timeout_grows_with_the_audio_it_generates(job_store: JobStore) -> None:
    settings = Settings(_env_file=None, job_timeout_seconds=600, job_seconds_per_minute=90)
    assert settings.job_timeout(8.0) == 612.0
    assert settings.job_timeout(600.0) == 1500.0 and settings.job_timeout(60.0, num_samples=2) == 780.0

    # job_store: 0.5 s plus 30 s per generated minute; each job runs 1000 steps, longer than its timeout
    jobs = {duration: queue_text_job(job_store, duration, num_steps=1000) for duration in (1.0, 4.0)}
    timeouts = {duration: 0.5 + 30 * duration / 60 for duration in jobs}  # 1 s and 2.5 s
    for duration, record in jobs.items():  # the RQ entry carries the job's own timeout (whole seconds)
        entry = job_store.redis.hget(f"{queue.RQ_JOB_PREFIX}{queue.rq_job_id(record.id, 1)}", "timeout")
        assert int(entry) == int(timeouts[duration])
    executor = JobExecutor(job_store.redis, job_store, job_store.store, tiny_pipeline(VARIANT), "w1")
    claims = claims_of(job_store, "w1")
    for duration, record in jobs.items():
        claimed = claims.claim(1, executor.model_info())
        assert [job.id for job in claimed] == [record.id]
        started = time.monotonic()
        executor.finish(*executor.run(claimed, {}))
        elapsed = time.monotonic() - started
        failed = job_store.get(record.id)
        assert failed.status is JobStatus.failed and failed.error["type"].endswith(":timeout")
        assert failed.error["detail"] == f"the job ran longer than {timeouts[duration]:g} s"
        assert timeouts[duration] < elapsed < timeouts[duration] + 30
