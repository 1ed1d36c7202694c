"""Helpers of the end-to-end tests: service processes (uvicorn and workers with the `tiny` weights) started
as subprocesses, and waiting for jobs over HTTP.

Stacks share one redis-server; each uses its own Redis database so their queues, jobs and settings never
meet. The main stack requires API keys; the crash stacks run without keys and store files on disk.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from model.testkit import free_port

REPO = Path(__file__).resolve().parents[2]
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
KEY_A, KEY_B = "key-alice-0123456789", "key-bob-9876543210"
WEBHOOK_SECRET = "whsec_" + "c2VjcmV0LWZvci10ZXN0cy1vbmx5LTEyMzQ1Ng=="
START_TIMEOUT = 180.0  # torch imports (and the worker warms up) slowly on a busy 2-core machine
JOB_TIMEOUT = 300.0  # the tiny preset takes seconds per job on a busy 2-core machine
CLIENT_TIMEOUT = 120.0  # longer than any Prefer: wait the tests send
QUICK = {"duration": 1.0, "num_steps": 1}  # the cheapest job, for tests that do not look at the audio
SLOW = {"duration": 2.0, "num_steps": 200}  # runs long enough to be caught mid-sampling, then canceled or killed
WAIT = {"Prefer": "wait=60"}
MAIN_SETTINGS = {
    "MMAUDIO_WEIGHTS": "tiny",
    "MMAUDIO_VARIANT": "large_44k_v2",
    "MMAUDIO_VARIANTS": "large_44k_v2,small_16k",  # small_16k has no worker: its queue only fills
    "MMAUDIO_API_KEYS": f"alice:{hashlib.sha256(KEY_A.encode()).hexdigest()},"
    f"{hashlib.sha256(KEY_B.encode()).hexdigest()}",
    "MMAUDIO_MAX_UPLOAD_BYTES": str(3 * 2**20),
    "MMAUDIO_MAX_VIDEO_SECONDS": "20",
    "MMAUDIO_MAX_VIDEO_SIDE": "1024",
    "MMAUDIO_MAX_DURATION": "10",
    "MMAUDIO_MAX_NUM_STEPS": "200",
    "MMAUDIO_MAX_QUEUE": "4",
    "MMAUDIO_WEBHOOK_SECRET": WEBHOOK_SECRET,
    "MMAUDIO_WEBHOOK_ALLOW_PRIVATE": "true",
    "MMAUDIO_WEBHOOK_BACKOFF_SECONDS": "0.5",
    "MMAUDIO_WEBHOOK_PROGRESS_INTERVAL_SECONDS": "0.5",
    "MMAUDIO_WORKER_HEARTBEAT_SECONDS": "0.5",
    "MMAUDIO_WORKER_TTL_SECONDS": "2",
    "MMAUDIO_MAINTENANCE_INTERVAL_SECONDS": "0.25",
}


def redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(port: int, folder: Path, aof: bool = False) -> subprocess.Popen:
    """A real redis-server on ``port``, once it answers: without persistence, or (``aof``) with an append-only
    file in ``folder`` synced at every write, so that a restart on the same folder loses nothing."""
    command = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder), "--save", ""]
    persistence = ["--appendonly", "yes", "--appendfsync", "always"] if aof else ["--appendonly", "no"]
    process = subprocess.Popen([*command, *persistence], stdout=subprocess.DEVNULL)
    wait_until(lambda: redis_ping(port), 20, "redis-server")
    return process


def child_pids(pid: int) -> list[int]:
    """Direct children of every thread of process ``pid``."""
    tasks = Path(f"/proc/{pid}/task").iterdir()
    return [int(child) for task in tasks for child in (task / "children").read_text().split()]


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log: Path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Stack:
    """One deployment: an API and its workers on one Redis database."""

    name: str
    env: dict[str, str]
    folder: Path
    port: int = field(default_factory=free_port)
    api: Process | None = None
    workers: list[Process] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self, name: str, command: list[str], extra_env: dict[str, str] | None = None) -> Process:
        log = self.folder / f"{name}.log"
        handle = log.open("wb")
        popen = subprocess.Popen(
            command, cwd=REPO, env={**self.env, **(extra_env or {})}, stdout=handle, stderr=subprocess.STDOUT
        )
        return Process(name, popen, log)

    def start_api(self) -> None:
        command = [sys.executable, "-m", "service.api", "--host", "127.0.0.1", "--port", str(self.port)]
        self.api = self._spawn("api", [*command, "--log-level", "warning"])
        wait_until(self._api_answers, START_TIMEOUT, f"{self.name} API")

    def _api_answers(self) -> bool:
        assert self.api is not None
        if self.api.popen.poll() is not None:
            raise RuntimeError(f"{self.name} API exited:\n{self.api.tail()}")
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def start_worker(self, extra_env: dict[str, str] | None = None) -> Process:
        worker = self._spawn(f"worker{len(self.workers)}", [sys.executable, "-m", "service.worker"], extra_env)
        self.workers.append(worker)
        return worker

    def ready_workers(self) -> int:
        response = httpx.get(f"{self.url}/readyz", timeout=5)
        return response.json()["workers"] if response.status_code == 200 else 0

    def wait_for_workers(self, count: int) -> None:
        def enough() -> bool:
            for worker in self.workers:
                if worker.popen.poll() is not None and worker.popen.returncode not in (0, -signal.SIGKILL):
                    raise RuntimeError(f"{worker.name} exited:\n{worker.tail()}")
            return self.ready_workers() >= count

        wait_until(enough, START_TIMEOUT, f"{count} ready worker(s) in {self.name}", interval=0.25)

    def stop(self) -> None:
        for process in [*self.workers, *([self.api] if self.api else [])]:
            process.stop()

    def logs(self) -> str:
        processes = [*([self.api] if self.api else []), *self.workers]
        return "\n".join(f"--- {p.name} ---\n{p.tail()}" for p in processes)

    @contextmanager
    def running(self, workers: int = 0) -> Iterator[Stack]:
        """The API and ``workers`` ready workers while the block runs; every process's log tail is printed
        when the block fails, and everything is stopped after it."""
        for _ in range(workers):
            self.start_worker()
        self.start_api()
        try:
            if workers:
                self.wait_for_workers(workers)
            yield self
        except BaseException:
            print(self.logs())
            raise
        finally:
            self.stop()


def make_stack(redis_server: str, folder: Path, name: str, database: int, settings: dict[str, str]) -> Stack:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MMAUDIO_")}
    # a worker counts as ready 1 s after its warm-up here (10 s by default), so that stacks start quickly
    env |= {"MMAUDIO_REDIS_URL": f"{redis_server}/{database}", "PYTHONUNBUFFERED": "1"}
    env |= {"MMAUDIO_WORKER_STABLE_SECONDS": "1", **settings}
    folder.mkdir(parents=True, exist_ok=True)
    return Stack(name, env, folder)


@dataclass(frozen=True)
class Media:
    video: Path  # 1.6 s, 320x240, 25 fps H.264 with an AAC track of its own
    image: Path
    audio_only: Path
    truncated: Path
    empty: Path
    text: Path
    unknown_codec: Path
    too_long: Path  # 25 s: over MMAUDIO_MAX_VIDEO_SECONDS
    too_short: Path  # 0.4 s: shorter than one synchronisation window
    too_wide: Path  # 1280 px: over MMAUDIO_MAX_VIDEO_SIDE


def form(params: dict) -> dict[str, str]:
    """Job parameters as multipart form fields."""
    return {name: str(value) for name, value in params.items()}


def wait_for_status(client: httpx.Client, job_id: str, statuses: set[str], timeout: float = JOB_TIMEOUT) -> dict:
    def reached() -> dict | None:
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in statuses else None

    return wait_until(reached, timeout, f"job {job_id} to reach {statuses}", interval=0.1)


def wait_for_sampling(client: httpx.Client, job_id: str, timeout: float = JOB_TIMEOUT) -> dict:
    """Until the job is running and has made at least one sampling step."""

    def sampling() -> dict | None:
        job = client.get(f"/v1/jobs/{job_id}").json()
        progress = job["progress"] or {}
        return job if progress.get("stage") == "sampling" and progress.get("fraction", 0) > 0 else None

    return wait_until(sampling, timeout, f"job {job_id} to start sampling", interval=0.05)


class WebhookReceiver:
    """An HTTP server recording every POST; answers 500 to the first `failures` of them."""

    def __init__(self, failures: int = 0) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.failures = failures
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(500 if len(receiver.requests) <= receiver.failures else 204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()


def signed_with_test_secret(headers: dict[str, str], body: bytes) -> bool:
    """Whether a webhook delivery carries the Standard Webhooks signature made with WEBHOOK_SECRET."""
    key = base64.b64decode(WEBHOOK_SECRET.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return f"v1,{expected}" in headers["webhook-signature"].split(" ")
