"""The S3 store end to end: a real S3-speaking server (moto in server mode, its own process on a free port),
the real API and worker over HTTP, and boto3 looking into the bucket.

The worker reaches the bucket through a relay whose uplink the last test slows down, so that the worker is
caught (and SIGKILLed) in the middle of a multipart upload of a result.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import pytest
from redis import Redis
from service_harness import CLIENT_TIMEOUT, QUICK, Stack, form, make_stack, wait_for_status, wait_until

from model.testkit import free_port, make_noise_video, start_s3_server
from service import keys
from service.settings import Settings

BUCKET = "mmaudio-tests"
PREFIX = "svc/"
DATABASE = 11
PART_BYTES = 5 * 2**20  # S3's smallest part: a result of a few parts stays quick to make
RESULT_TTL_SECONDS = 40
STALE_UPLOAD_SECONDS = 3
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class SlowLink:
    """A TCP relay to 127.0.0.1:``target``; while ``rate`` is set, client-to-server bytes flow at that many
    bytes per second (a slow uplink), the answers at full speed."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.rate: float | None = None
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, uplink: bool) -> None:
        try:
            while data := source.recv(16384):
                sink.sendall(data)
                if uplink and self.rate:
                    time.sleep(len(data) / self.rate)
        except OSError:
            pass
        finally:
            source.close()
            sink.close()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(scope="module")
def s3_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    port = free_port()
    process = start_s3_server(port, tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        yield port
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture(scope="module")
def bucket(s3_port: int) -> object:
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{s3_port}", region_name="us-east-1", **_keys())
    client.create_bucket(Bucket=BUCKET)
    return client


def _keys() -> dict[str, str]:
    return {"aws_access_key_id": AWS["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": AWS["AWS_SECRET_ACCESS_KEY"]}


@pytest.fixture(scope="module")
def uplink(s3_port: int) -> Iterator[SlowLink]:
    link = SlowLink(s3_port)
    yield link
    link.close()


def s3_settings(s3_port: int) -> dict[str, str]:
    return {
        **AWS,
        "MMAUDIO_WEIGHTS": "tiny",
        "MMAUDIO_VARIANT": "large_44k_v2",
        "MMAUDIO_VARIANTS": "large_44k_v2,small_16k",  # small_16k has no worker: its jobs stay queued
        "MMAUDIO_STORAGE": "s3",
        "MMAUDIO_S3_BUCKET": BUCKET,
        "MMAUDIO_S3_PREFIX": PREFIX,
        "MMAUDIO_S3_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
        "MMAUDIO_S3_REGION": "us-east-1",
        "MMAUDIO_S3_PART_BYTES": str(PART_BYTES),
        "MMAUDIO_S3_STALE_UPLOAD_SECONDS": str(STALE_UPLOAD_SECONDS),
        "MMAUDIO_RESULT_TTL_SECONDS": str(RESULT_TTL_SECONDS),
        "MMAUDIO_MAX_UPLOAD_BYTES": str(64 * 2**20),
        "MMAUDIO_MAX_VIDEO_SIDE": "1024",
        "MMAUDIO_WORKER_HEARTBEAT_SECONDS": "0.5",
        "MMAUDIO_WORKER_TTL_SECONDS": "2",
        "MMAUDIO_MAINTENANCE_INTERVAL_SECONDS": "0.25",
    }


@pytest.fixture(scope="module")
def s3_stack(
    redis_server: str, tmp_path_factory: pytest.TempPathFactory, s3_port: int, bucket: object, uplink: SlowLink
) -> Iterator[Stack]:
    """API and one worker on the S3 store; the worker's way to the bucket is the relay."""
    stack = make_stack(redis_server, tmp_path_factory.mktemp("s3"), "s3", DATABASE, s3_settings(s3_port))
    Redis.from_url(stack.env["MMAUDIO_REDIS_URL"]).flushdb()
    stack.start_worker({"MMAUDIO_S3_ENDPOINT_URL": f"http://127.0.0.1:{uplink.port}"})
    with stack.running():
        stack.wait_for_workers(1)
        yield stack


@pytest.fixture(scope="module")
def redirect_api(
    redis_server: str, tmp_path_factory: pytest.TempPathFactory, s3_port: int, s3_stack: Stack
) -> Iterator[Stack]:
    """A second API on the same jobs that answers downloads with a redirect to the bucket."""
    settings = s3_settings(s3_port) | {"MMAUDIO_S3_DOWNLOAD": "redirect", "MMAUDIO_S3_PRESIGN_SECONDS": "60"}
    with make_stack(
        redis_server, tmp_path_factory.mktemp("s3-redirect"), "s3-redirect", DATABASE, settings
    ).running() as stack:
        yield stack


@pytest.fixture(scope="module")
def big_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1.6 s of noise at 640x480: about 17 MB, so the upload and the mp4 result go up in several parts."""
    return make_noise_video(tmp_path_factory.mktemp("s3-media") / "noise.mp4", 1.6, (640, 480))


@pytest.fixture
def client(s3_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=s3_stack.url, timeout=CLIENT_TIMEOUT) as client:
        yield client


def submit_video(client: httpx.Client, video: Path, **params: object) -> dict:
    with video.open("rb") as handle:
        response = client.post("/v1/jobs", data=form({**QUICK, **params}), files={"video": ("noise.mp4", handle)})
    assert response.status_code == 202, response.text
    return response.json()


def objects(bucket: object, under: str) -> dict[str, int]:
    """Key (without our prefix) -> size of every object under ``under``."""
    pages = bucket.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=PREFIX + under)
    return {item["Key"].removeprefix(PREFIX): item["Size"] for page in pages for item in page.get("Contents", [])}


def multipart_uploads(bucket: object, under: str = "") -> list[str]:
    uploads = bucket.list_multipart_uploads(Bucket=BUCKET, Prefix=PREFIX + under).get("Uploads", [])
    return [upload["Key"] for upload in uploads]


def object_bytes(bucket: object, name: str) -> bytes:
    return bucket.get_object(Bucket=BUCKET, Key=PREFIX + name)["Body"].read()


def test_s3_storage_needs_a_bucket() -> None:
    with pytest.raises(ValueError, match="MMAUDIO_S3_BUCKET"):
        Settings(storage="s3")
    assert Settings(storage="s3", s3_bucket="b").s3_download == "stream"


def test_upload_lands_in_the_bucket_and_goes_with_the_job(
    client: httpx.Client, bucket: object, big_video: Path
) -> None:
    job = submit_video(client, big_video, variant="small_16k")  # no worker serves it: it stays queued
    assert job["status"] == "queued"
    name = f"uploads/{job['id']}"
    assert objects(bucket, name) == {name: big_video.stat().st_size}
    assert object_bytes(bucket, name) == big_video.read_bytes()
    assert client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "canceled"
    assert objects(bucket, name) == {}
    assert multipart_uploads(bucket) == []


@pytest.fixture(scope="module")
def finished(s3_stack: Stack, redirect_api: Stack, big_video: Path) -> dict:
    """A video job that succeeded on the S3 store; its mp4 result went up in parts. (Both APIs are up before it
    is submitted: its results live RESULT_TTL_SECONDS from then on.)"""
    with httpx.Client(base_url=s3_stack.url, timeout=CLIENT_TIMEOUT) as client:
        job = submit_video(client, big_video)
        done = wait_for_status(client, job["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded", done["error"]
    return done


def test_results_are_objects_and_download_with_ranges(client: httpx.Client, bucket: object, finished: dict) -> None:
    job_id = finished["id"]
    stored = objects(bucket, f"results/{job_id}/")
    assert set(stored) == {f"results/{job_id}/0.mp4", f"results/{job_id}/0.flac"}
    assert stored[f"results/{job_id}/0.mp4"] > 2 * PART_BYTES
    assert objects(bucket, f"uploads/{job_id}") == {}  # the upload went when the job ended
    mp4 = object_bytes(bucket, f"results/{job_id}/0.mp4")

    whole = client.get(f"/v1/jobs/{job_id}/result")
    assert whole.status_code == 200
    assert whole.headers["content-type"] == "video/mp4"
    assert whole.content == mp4
    part = client.get(f"/v1/jobs/{job_id}/result", headers={"Range": "bytes=1000-5999999"})
    assert part.status_code == 206
    assert part.headers["content-range"] == f"bytes 1000-5999999/{len(mp4)}"
    assert part.content == mp4[1000:6000000]
    tail = client.get(f"/v1/jobs/{job_id}/result", headers={"Range": "bytes=-100"})
    assert tail.status_code == 206 and tail.content == mp4[-100:]
    flac = client.get(f"/v1/jobs/{job_id}/result", params={"format": "flac"})
    assert flac.content == object_bytes(bucket, f"results/{job_id}/0.flac")
    # a format converted on demand is stored next to the master, in the bucket
    wav = client.get(f"/v1/jobs/{job_id}/result", params={"format": "wav"})
    assert wav.status_code == 200 and wav.content[:4] == b"RIFF"
    assert object_bytes(bucket, f"results/{job_id}/0.wav") == wav.content


def test_redirect_mode_answers_302_to_a_presigned_url(redirect_api: Stack, bucket: object, finished: dict) -> None:
    job_id = finished["id"]
    mp4 = object_bytes(bucket, f"results/{job_id}/0.mp4")
    with httpx.Client(base_url=redirect_api.url, timeout=CLIENT_TIMEOUT) as client:
        answer = client.get(f"/v1/jobs/{job_id}/result")
        assert answer.status_code == 302
        location = answer.headers["location"]
        assert "X-Amz-Signature=" in location and "X-Amz-Expires=60" in location
        assert answer.headers["cache-control"] == "no-store"
        fetched = httpx.get(location, timeout=CLIENT_TIMEOUT)
        assert fetched.status_code == 200
        assert fetched.content == mp4
        assert fetched.headers["content-type"] == "video/mp4"
        assert "attachment" in fetched.headers["content-disposition"]
        ranged = httpx.get(location, headers={"Range": "bytes=10-1009"}, timeout=CLIENT_TIMEOUT)
        assert ranged.status_code == 206 and ranged.content == mp4[10:1010]
        # a presigned URL signs GET alone: HEAD is answered by the API itself
        head = client.head(f"/v1/jobs/{job_id}/result")
        assert head.status_code == 200 and int(head.headers["content-length"]) == len(mp4)


def test_expired_results_are_deleted_from_the_bucket(client: httpx.Client, bucket: object, finished: dict) -> None:
    job_id = finished["id"]
    assert objects(bucket, f"results/{job_id}/")
    wait_until(lambda: not objects(bucket, f"results/{job_id}/"), RESULT_TTL_SECONDS + 30, "the results to expire", 0.5)
    assert client.get(f"/v1/jobs/{job_id}").status_code == 404


def test_worker_killed_mid_upload_leaves_no_multipart_upload(
    s3_stack: Stack, client: httpx.Client, bucket: object, uplink: SlowLink, big_video: Path
) -> None:
    """Last in the module: it kills the stack's only worker."""
    job = submit_video(client, big_video)
    wait_for_status(client, job["id"], {"running"})
    uplink.rate = 256 << 10  # per connection: a 5 MiB part now takes 20 s to go up
    under = f"results/{job['id']}/"
    try:
        wait_until(lambda: multipart_uploads(bucket, under), 120, "the result's multipart upload", 0.05)
        # a slow upload that still makes progress outlives the bound: the upkeep leaves it alone
        time.sleep(STALE_UPLOAD_SECONDS * 2 + 1)
        assert multipart_uploads(bucket, under), "a live upload was aborted"
        assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "running"
        s3_stack.workers[0].stop(signal.SIGKILL)
    finally:
        uplink.rate = None
    assert multipart_uploads(bucket, under), "the kill came after the upload had completed"
    failed = wait_for_status(client, job["id"], {"failed"}, timeout=60)
    assert failed["error"]["type"] == "urn:mmaudio:problem:worker-lost"
    # the upkeep aborts the upload once its writer has made no progress for the bound
    wait_until(lambda: not multipart_uploads(bucket), STALE_UPLOAD_SECONDS * 4 + 10, "the orphan upload's abort")
    assert objects(bucket, f"uploads/{job['id']}") == {}
    assert f"results/{job['id']}/0.mp4" not in objects(bucket, under)
    redis = Redis.from_url(s3_stack.env["MMAUDIO_REDIS_URL"])
    assert redis.zcard(keys.S3_WRITES) == 0  # the dead writer's mark is gone too
