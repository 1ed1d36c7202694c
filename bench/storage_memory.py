"""Peak memory of a large file through the S3 store (issue 12): a 200 MB result never sits whole in memory.

    .venv/bin/python -m bench.storage_memory [--megabytes 200] [--part-mib 16] [--in-process]

Starts moto's S3 server (its own process on a free port; the dev extra), makes a video of random pixels of
about --megabytes (1280x720, 25 fps, as many seconds as that takes) and measures peak RSS (VmHWM of
/proc/<pid>/status, so a spike between two samples still counts) in two parts:

1. In this process: the store's `put_file` of the video (a multipart upload, as the API stores an upload),
   `read` of it whole (what a streamed download relays), `local_path` (a worker fetching an upload), then a
   worker's results path, `Results.store_job` (the mp4 mux of the whole video, then its multipart upload).
   Printed: the peak after each step minus the peak after the imports (torch included).
2. The service (`python -m service`: its redis-server, the API, one worker with the `tiny` weights) on the S3
   store: the video is uploaded through the API, the worker runs the job on the whole video and stores an
   mp4 result of about the same size, the client downloads it in a stream. Printed: the peak of the API and
   of the worker before the job and after each step (the worker's includes decoding the video for the model).

A process that held the file whole would peak at least its size above its start.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import av
import boto3
import httpx
import torch
from redis import Redis
from redis.exceptions import RedisError

from bench.service_load import local_service
from model.testkit import free_port, make_noise_video, start_s3_server
from service.results import Results
from service.settings import Settings
from service.storage import make_store

BUCKET = "mmaudio-bench"
MB = 1e6
AWS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
VIDEO_SIZE = (1280, 720)
FRAMES_PER_SECOND = 25
RESULT_RATE = 44100
BYTES_PER_PIXEL = 1.4  # of make_noise_video's frames


def peak_mb(pid: int | str = "self") -> float:
    """VmHWM (peak resident set size) of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / MB
    raise RuntimeError(f"no VmHWM for process {pid}")


def child_running(pid: int, module: str) -> int:
    """The child of process ``pid`` that runs `python -m <module>`."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[1:3] == [b"-m", module.encode()]:
                return int(child)
    raise RuntimeError(f"process {pid} has no child running {module}")


def store_part(endpoint: str, video: Path, part_mib: int, folder: Path) -> None:
    """Part 1: the store's own calls and a worker's results path, in this process."""
    settings = Settings(
        storage="s3", s3_bucket=BUCKET, s3_endpoint_url=endpoint, s3_region="us-east-1", s3_part_bytes=part_mib << 20
    )
    with redis_server(folder) as redis:
        store = make_store(settings, redis)
        size = video.stat().st_size
        base = peak_mb()
        print(f"\n1. in this process ({size / MB:.0f} MB file, parts of {part_mib} MiB), peak RSS above the imports:")
        print(f"   after imports                       {base:8.1f} MB")

        def step(what: str, run: Callable[[], object]) -> None:
            started = time.perf_counter()
            run()
            print(f"   {what:<33} +{peak_mb() - base:7.1f} MB   {time.perf_counter() - started:5.1f} s")

        def fetch() -> None:
            with store.local_path("uploads/bench") as path:
                assert path.stat().st_size == size

        step("put_file (multipart upload)", lambda: store.put_file("uploads/bench", video, 3600))
        step("read whole (streamed download)", lambda: sum(len(chunk) for chunk in store.read("uploads/bench")))
        step("local_path (a worker's fetch)", fetch)
        seconds = probe_seconds(video)
        silence = torch.zeros(1, round(seconds * RESULT_RATE))  # one mono sample
        step(
            "Results.store_job (mux + store)",
            lambda: Results(store).store_job("bench", "mp4", silence, RESULT_RATE, seconds, video, 3600),
        )


def probe_seconds(video: Path) -> float:
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        return float(stream.frames / stream.average_rate)


@contextmanager
def redis_server(folder: Path) -> Iterator[Redis]:
    """A redis-server of our own for the store's expiry index and progress marks."""
    port = free_port()
    command = ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(folder)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    redis = Redis(port=port)
    try:
        for _ in range(100):
            try:
                redis.ping()
                break
            except RedisError:
                time.sleep(0.1)
        yield redis
    finally:
        process.terminate()
        process.wait(10)


def make_video(megabytes: float, folder: Path) -> Path:
    width, height = VIDEO_SIZE
    seconds = max(1.0, megabytes * MB / (width * height * BYTES_PER_PIXEL * FRAMES_PER_SECOND))
    started = time.perf_counter()
    video = make_noise_video(folder / "noise.mp4", seconds, VIDEO_SIZE, FRAMES_PER_SECOND)
    print(
        f"video: {video.stat().st_size / MB:.0f} MB of random pixels ({seconds:.1f} s of {width}x{height} at "
        f"{FRAMES_PER_SECOND} fps, made in {time.perf_counter() - started:.0f} s)"
    )
    return video


def service_part(endpoint: str, video: Path, part_mib: int, folder: Path) -> None:
    """Part 2: the API and a worker, each its own process, on the S3 store."""
    size = video.stat().st_size
    seconds = probe_seconds(video)
    print("\n2. the service on the S3 store, peak RSS of each process:")
    os.environ.update(
        MMAUDIO_STORAGE="s3",
        MMAUDIO_S3_BUCKET=BUCKET,
        MMAUDIO_S3_ENDPOINT_URL=endpoint,
        MMAUDIO_S3_REGION="us-east-1",
        MMAUDIO_S3_PART_BYTES=str(part_mib << 20),
        MMAUDIO_MAX_UPLOAD_BYTES=str(4 * size),
        MMAUDIO_MAX_VIDEO_SIDE=str(max(VIDEO_SIZE)),
        MMAUDIO_JOB_TIMEOUT_SECONDS="1800",
    )
    service_args = argparse.Namespace(
        variant="large_44k_v2", weights="tiny", workers=1, max_batch=1, jobs=1, duration=seconds, steps=1
    )
    with local_service(service_args, folder) as url, httpx.Client(base_url=url, timeout=600) as client:
        launcher = child_running(os.getpid(), "service")
        roles = {role: child_running(launcher, f"service.{role}") for role in ("api", "worker")}

        def show(step: str) -> None:
            peaks = "   ".join(f"{role} {peak_mb(pid):7.1f} MB" for role, pid in sorted(roles.items()))
            print(f"   {step:<48} {peaks}")

        show("ready (before the job)")
        started = time.perf_counter()
        with video.open("rb") as handle:
            fields = {"duration": str(seconds), "num_steps": "1"}
            response = client.post("/v1/jobs", data=fields, files={"video": ("noise.mp4", handle)})
        response.raise_for_status()
        job = response.json()
        show(f"upload stored ({time.perf_counter() - started:.0f} s)")
        while job["status"] not in ("succeeded", "failed", "canceled"):
            time.sleep(0.5)
            job = client.get(f"/v1/jobs/{job['id']}").json()
        if job["status"] != "succeeded":
            raise SystemExit(f"the job {job['status']}: {job.get('error')}")
        result_size = next(file["size"] for file in job["result"]["files"] if file["format"] == "mp4")
        show(f"result stored, {result_size / MB:.0f} MB ({job['timings']['encode']:.0f} s to mux and store)")
        started = time.perf_counter()
        with client.stream("GET", f"/v1/jobs/{job['id']}/result") as download:
            received = sum(len(chunk) for chunk in download.iter_bytes())
        assert received == result_size
        show(f"result downloaded ({time.perf_counter() - started:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=float, default=200.0, help="size of the file and of the result")
    parser.add_argument("--part-mib", type=int, default=16, help="MMAUDIO_S3_PART_BYTES in MiB")
    parser.add_argument("--in-process", action="store_true", help="only part 1 (no service, no model)")
    args = parser.parse_args()
    os.environ.update(AWS)
    load = os.getloadavg()[0]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load {load:.1f}, Python {platform.python_version()}")
    with tempfile.TemporaryDirectory(prefix="mmaudio-bench-") as name:
        folder = Path(name)
        port = free_port()
        moto = start_s3_server(port, folder / "moto.log")
        endpoint = f"http://127.0.0.1:{port}"
        try:
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
            video = make_video(args.megabytes, folder)
            store_part(endpoint, video, args.part_mib, folder)
            if not args.in_process:
                service_part(endpoint, video, args.part_mib, folder)
        finally:
            moto.terminate()
            moto.wait(10)


if __name__ == "__main__":
    main()
