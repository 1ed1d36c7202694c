"""Load on the real service over HTTP: throughput, latency and service overhead (issue 4).

    .venv/bin/python -m bench.service_load [--url URL] [--jobs 32] [--concurrency 8]
        [--duration 8] [--steps 25] [--video PATH | --video-size 1280x720] [--prompt TEXT]
        [--variant large_44k_v2] [--weights tiny] [--workers 1] [--max-batch 8] [--api-key KEY]

Without --url it starts the whole service with one command (`python -m service`: its own redis-server
on a free port, the workers and the API), with the --variant/--weights/--workers/--max-batch given and
MMAUDIO_* settings from the environment for the rest. Every client thread submits a job, waits for it to
end (`Prefer: wait`, then polling), and submits the next, until --jobs have run; text jobs by default, or
uploads of a video (--video, or one made here at --video-size).

Prints clips per second (jobs done over the wall time from the first submit to the last end), latency
(submit to done) p50/p95, and the service overhead per job: its latency minus the pipeline's own time
(the job's model timings: decode and the model pass). The overhead includes the wait in the queue
behind other batches, so it grows with the concurrency; with --concurrency 1 it is the pure service cost.
Queue time, batch sizes and the per-stage medians of the jobs are printed too. On a GPU box with
official weights this is the throughput measurement of issue 4 (>= 8 clips/s, large_44k_v2, 8 s clips).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import httpx

from model.testkit import frame_size, free_port, make_video
from service.serve import STOP_GRACE_SECONDS
from service.settings import Variant

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_SECONDS = 600.0  # a worker fetches or loads its weights and warms up before it is ready
WAIT_SECONDS = 60  # the API's default cap on Prefer: wait
POLL_SECONDS = 0.05
TERMINAL = {"succeeded", "failed", "canceled"}


@dataclass
class Outcome:
    status: str
    latency: float  # submit to done, seconds, as the client saw it
    job: dict




@contextmanager
def local_service(args: argparse.Namespace, folder: Path) -> Iterator[str]:
    """The service started with `python -m service` on free ports; yields its URL once its workers are ready."""
    port = free_port()
    env = {
        **os.environ,
        "MMAUDIO_HOST": "127.0.0.1",
        "MMAUDIO_PORT": str(port),
        "MMAUDIO_REDIS_PORT": str(free_port()),
        "MMAUDIO_DATA_DIR": str(folder / "data"),
        "MMAUDIO_VARIANT": args.variant,
        "MMAUDIO_WEIGHTS": args.weights,
        "MMAUDIO_WORKERS": str(args.workers),
        "MMAUDIO_MAX_BATCH": str(args.max_batch),
        "MMAUDIO_MAX_QUEUE": str(max(args.jobs, 100)),
        "MMAUDIO_MAX_DURATION": str(max(args.duration, 30.0)),
        "MMAUDIO_MAX_NUM_STEPS": str(max(args.steps, 100)),
    }
    env.pop("MMAUDIO_REDIS_URL", None)  # its own redis-server: nothing else's queue is measured
    log = (folder / "service.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO, env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not ready(url, args.workers):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the service did not become ready; its log:\n{tail(folder / 'service.log')}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(STOP_GRACE_SECONDS + 10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def ready(url: str, workers: int) -> bool:
    try:
        response = httpx.get(f"{url}/readyz", timeout=2)
    except httpx.TransportError:
        return False
    return response.status_code == 200 and response.json()["workers"] >= workers


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def run_job(client: httpx.Client, fields: dict[str, str], video: Path | None) -> Outcome:
    started = time.perf_counter()
    headers = {"Prefer": f"wait={WAIT_SECONDS}"}
    if video is None:
        response = client.post("/v1/jobs", json=fields, headers=headers)
    else:
        with video.open("rb") as handle:
            response = client.post("/v1/jobs", data=fields, files={"video": handle}, headers=headers)
    if response.status_code not in (200, 202):
        raise RuntimeError(f"submit answered {response.status_code}: {response.text}")
    job = response.json()
    while job["status"] not in TERMINAL:
        time.sleep(POLL_SECONDS)
        job = client.get(f"/v1/jobs/{job['id']}").json()
    return Outcome(job["status"], time.perf_counter() - started, job)


def run_load(args: argparse.Namespace, url: str, video: Path | None) -> tuple[list[Outcome], float]:
    fields = {"prompt": args.prompt, "duration": args.duration, "num_steps": args.steps}
    if video is not None:
        fields = {name: str(value) for name, value in fields.items()}
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    outcomes: list[Outcome] = []
    remaining = iter(range(args.jobs))
    lock = threading.Lock()

    def client_thread() -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=WAIT_SECONDS + 30) as client:
            while True:
                with lock:
                    if next(remaining, None) is None:
                        return
                outcome = run_job(client, fields, video)
                with lock:
                    outcomes.append(outcome)

    with httpx.Client(base_url=url, headers=headers, timeout=WAIT_SECONDS + 30) as client:
        for _ in range(args.warmup):  # first requests through the stack: not measured
            run_job(client, fields, video)
    started = time.perf_counter()
    threads = [threading.Thread(target=client_thread) for _ in range(args.concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes, time.perf_counter() - started


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def report(args: argparse.Namespace, outcomes: list[Outcome], wall: float, video: Path | None) -> None:
    done = [o for o in outcomes if o.status == "succeeded"]
    failed = [o for o in outcomes if o.status != "succeeded"]
    model = done[0].job["model"] if done else {"variant": args.variant, "weights": {"kind": args.weights}}
    kind = f"video {video.name}" if video else "text"
    print(f"machine: {platform.node()} ({os.cpu_count()} CPUs), {platform.platform()}")
    print(
        f"service: variant {model['variant']}, weights {model['weights']['kind']}; jobs: {kind}, "
        f"{args.duration:g} s, {args.steps} steps; {args.jobs} jobs, concurrency {args.concurrency}"
    )
    if failed:
        print(
            f"NOT SUCCEEDED: {len(failed)} ({', '.join(sorted({o.status for o in failed}))}); first error: "
            f"{failed[0].job.get('error')}"
        )
    if not done:
        return
    latency = [o.latency for o in done]
    model_seconds = [o.job["timings"]["model"]["total"] for o in done]
    overhead = [lat - mod for lat, mod in zip(latency, model_seconds, strict=True)]
    queue = [o.job["timings"]["queue"] for o in done]
    batch = [o.job["timings"]["batch_size"] for o in done]
    print(f"throughput: {len(done) / wall:.2f} clips/s ({len(done)} in {wall:.2f} s)")
    print(f"latency (submit to done): p50 {percentile(latency, 0.5):.3f} s, p95 {percentile(latency, 0.95):.3f} s")
    print(
        f"service overhead (latency - model time): p50 {percentile(overhead, 0.5):.3f} s, "
        f"p95 {percentile(overhead, 0.95):.3f} s; of it in the queue: p50 {percentile(queue, 0.5):.3f} s"
    )
    ahead = sum(1 for o in done if o.job["timings"].get("prepared_ahead"))
    print(
        f"batches: mean size {statistics.mean(batch):.2f}, max {max(batch)}; inputs decoded ahead: {ahead}/{len(done)}"
    )
    stages = [name for name in done[0].job["timings"]["model"] if name != "total"]
    medians = {name: statistics.median(o.job["timings"]["model"][name] for o in done) for name in stages}
    medians["encode"] = statistics.median(o.job["timings"]["encode"] for o in done)
    print("stage medians per job (s): " + ", ".join(f"{name} {seconds:.3f}" for name, seconds in medians.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running service to load (default: start one here)")
    parser.add_argument("--jobs", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--prompt", default="")
    parser.add_argument("--video", type=Path, help="upload this video with every job (default: text jobs)")
    parser.add_argument(
        "--video-size", type=frame_size, help="upload a clip made here at WIDTHxHEIGHT, 25 fps, --duration"
    )
    parser.add_argument("--warmup", type=int, default=1, help="jobs run (one at a time) before measuring")
    parser.add_argument("--api-key", help="Bearer key, when the service requires one")
    parser.add_argument("--variant", choices=get_args(Variant), default="large_44k_v2", help="for the started service")
    parser.add_argument("--weights", choices=("official", "tiny"), default="tiny", help="for the started service")
    parser.add_argument("--workers", type=int, default=1, help="for the started service")
    parser.add_argument("--max-batch", type=int, default=8, help="for the started service")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="mmaudio-load-") as tmp:
        folder = Path(tmp)
        video = args.video
        if video is None and args.video_size is not None:
            video = make_video(folder / "clip.mp4", seconds=args.duration, fps=25, size=args.video_size)
        if args.url:
            outcomes, wall = run_load(args, args.url.rstrip("/"), video)
        else:
            with local_service(args, folder) as url:
                outcomes, wall = run_load(args, url, video)
        report(args, outcomes, wall, video)


if __name__ == "__main__":
    main()
