"""`python -m service`: the whole service on one machine with one command.

Starts a redis-server (unless MMAUDIO_REDIS_URL points at one), fetches the official weights of the
configured variant on first start (with progress), then runs MMAUDIO_WORKERS worker processes and the API
on MMAUDIO_HOST:MMAUDIO_PORT. A child that dies (Redis, a worker, the API) is restarted with growing delays;
after MMAUDIO_RESTART_ATTEMPTS quick deaths in a row of one child the launcher stops everything and exits 1,
so that a supervisor above it sees the failure. Ctrl-C or SIGTERM stops everything (exit 0); the children
are bound to the launcher's life (parent-death signal), so even a SIGKILL of it leaves no orphans.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from redis.exceptions import RedisError

from model.weights.manifest import WeightsError
from service.connection import connect
from service.settings import Settings, get_settings
from service.weights import ensure_weights

log = logging.getLogger("service.serve")

REDIS_START_SECONDS = 20.0
RESTART_BACKOFF_SECONDS = (1.0, 60.0)  # first and longest delay before restarting a crashed worker
HEALTHY_RUN_SECONDS = 300.0  # a worker that ran this long before dying is restarted without delay growth
STOP_GRACE_SECONDS = 30.0  # a worker finishes its current job within this, then it is killed
PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h): the signal a process gets when its parent dies


def die_with_parent() -> None:
    """Run in each child between fork and exec: SIGTERM it when the launcher dies, however it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


@dataclass
class Child:
    name: str
    command: list[str]
    env: dict[str, str]
    process: subprocess.Popen | None = None
    restart_delay: float = RESTART_BACKOFF_SECONDS[0]
    restart_at: float | None = None
    started_at: float = 0.0
    quick_deaths: int = 0  # deaths in a row, each before HEALTHY_RUN_SECONDS of running

    def start(self) -> None:
        log.info("starting %s", self.name)
        # its own process group: a Ctrl-C in the terminal reaches the launcher alone, which then stops the
        # children in order (Redis last, once nothing uses it)
        self.process = subprocess.Popen(self.command, env=self.env, process_group=0, preexec_fn=die_with_parent)
        self.started_at = time.monotonic()

    def terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()

    def wait(self, grace: float) -> None:
        """Wait for the terminated child to exit; kill it after ``grace`` seconds."""
        if self.process is None:
            return
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0f s; killing it", self.name, grace)
            self.process.kill()
            self.process.wait()


def stop_all(children: list[Child], grace: float) -> None:
    """Stop ``children`` together (each finishes what it is doing within ``grace``)."""
    for child in children:
        child.terminate()
    for child in children:
        child.wait(grace)


def start_redis(settings: Settings) -> Child:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed: install it, or set MMAUDIO_REDIS_URL to a running Redis")
    folder = settings.data_dir / "redis"
    folder.mkdir(parents=True, exist_ok=True)
    command = [
        binary,
        "--bind", "127.0.0.1",
        "--port", str(settings.redis_port),
        "--dir", str(folder.resolve()),
        "--appendonly", "yes",  # queued jobs survive a restart
        "--save", "",
    ]  # fmt: skip
    redis = Child("redis-server", command, dict(os.environ))
    redis.start()
    client = connect(settings)
    deadline = time.monotonic() + REDIS_START_SECONDS
    while True:
        try:
            client.ping()
            return redis
        except RedisError:
            if redis.process.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"redis-server did not start on port {settings.redis_port}")
            time.sleep(0.1)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    redis = start_redis(settings) if settings.redis_url is None else None
    env = dict(os.environ, MMAUDIO_REDIS_URL=settings.redis_address)
    workers = [
        Child(f"worker {index}", [sys.executable, "-m", "service.worker"], env) for index in range(settings.workers)
    ]
    api = Child("api", [sys.executable, "-m", "service.api"], env)
    failed: Child | None = None
    try:
        if settings.workers:
            try:
                ensure_weights(settings)  # once here, so parallel workers do not all print progress bars
            except WeightsError as err:
                sys.exit(str(err))
        for child in [*workers, api]:
            child.start()
        log.info("serving on http://%s:%d (docs at /docs)", settings.host, settings.port)
        supervised = [*([redis] if redis else []), api, *workers]
        while not stopping and failed is None:
            time.sleep(0.5)
            failed = next((c for c in supervised if not _supervise(c, settings.restart_attempts)), None)
    finally:
        stop_all([api, *workers], STOP_GRACE_SECONDS)
        if redis is not None:
            stop_all([redis], STOP_GRACE_SECONDS)
    if failed is not None:
        sys.exit(f"{failed.name} keeps dying ({failed.quick_deaths} times in a row); the service is stopped")


def _supervise(child: Child, attempts: int) -> bool:
    """Restart a child that exited, waiting longer after each quick death in a row; False once it died
    ``attempts`` times in a row without running for HEALTHY_RUN_SECONDS."""
    if child.process.poll() is None:
        return True
    now = time.monotonic()
    if child.restart_at is None:
        if now - child.started_at > HEALTHY_RUN_SECONDS:
            child.restart_delay, child.quick_deaths = RESTART_BACKOFF_SECONDS[0], 0
        child.quick_deaths += 1
        if child.quick_deaths >= attempts:
            log.error("%s exited (code %s), %d times in a row", child.name, child.process.returncode, attempts)
            return False
        log.error(
            "%s exited (code %s); restarting in %.0f s", child.name, child.process.returncode, child.restart_delay
        )
        child.restart_at = now + child.restart_delay
        child.restart_delay = min(child.restart_delay * 2, RESTART_BACKOFF_SECONDS[1])
    elif now >= child.restart_at:
        child.restart_at = None
        child.start()
    return True


if __name__ == "__main__":
    main()
