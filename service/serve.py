"""`python -m service`: the whole service on one machine with one command.

Starts a redis-server (unless MMAUDIO_REDIS_URL points at one), fetches the official weights of the
configured variant on first start (with progress), then runs MMAUDIO_WORKERS worker processes and the API
on MMAUDIO_HOST:MMAUDIO_PORT. A worker that dies is restarted; Ctrl-C or SIGTERM stops everything.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from redis import Redis
from redis.exceptions import RedisError

from model.weights.manifest import WeightsError
from service.settings import Settings, get_settings
from service.weights import ensure_weights

log = logging.getLogger("service.serve")

REDIS_START_SECONDS = 20.0
RESTART_BACKOFF_SECONDS = (1.0, 60.0)  # first and longest delay before restarting a crashed worker
HEALTHY_RUN_SECONDS = 300.0  # a worker that ran this long before dying is restarted without delay growth
STOP_GRACE_SECONDS = 30.0  # a worker finishes its current job within this, then it is killed


@dataclass
class Child:
    name: str
    command: list[str]
    env: dict[str, str]
    process: subprocess.Popen | None = None
    restart_delay: float = RESTART_BACKOFF_SECONDS[0]
    restart_at: float | None = None
    started_at: float = 0.0

    def start(self) -> None:
        log.info("starting %s", self.name)
        # its own process group: a Ctrl-C in the terminal reaches the launcher alone, which then stops the
        # children in order (Redis last, once nothing uses it)
        self.process = subprocess.Popen(self.command, env=self.env, process_group=0)
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
    client = Redis.from_url(settings.redis_address)
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
    try:
        if settings.workers:
            try:
                ensure_weights(settings)  # once here, so parallel workers do not all print progress bars
            except WeightsError as err:
                sys.exit(str(err))
        for child in [*workers, api]:
            child.start()
        log.info("serving on http://%s:%d (docs at /docs)", settings.host, settings.port)
        while not stopping:
            time.sleep(0.5)
            if api.process.poll() is not None:
                log.error("the API exited (code %s); stopping", api.process.returncode)
                break
            for worker in workers:
                _supervise(worker)
    finally:
        stop_all([api, *workers], STOP_GRACE_SECONDS)
        if redis is not None:
            stop_all([redis], STOP_GRACE_SECONDS)


def _supervise(worker: Child) -> None:
    """Restart a worker that exited, waiting longer after each crash in a row."""
    if worker.process.poll() is None:
        return
    now = time.monotonic()
    if worker.restart_at is None:
        if now - worker.started_at > HEALTHY_RUN_SECONDS:
            worker.restart_delay = RESTART_BACKOFF_SECONDS[0]
        log.error(
            "%s exited (code %s); restarting in %.0f s", worker.name, worker.process.returncode, worker.restart_delay
        )
        worker.restart_at = now + worker.restart_delay
        worker.restart_delay = min(worker.restart_delay * 2, RESTART_BACKOFF_SECONDS[1])
    elif now >= worker.restart_at:
        worker.restart_at = None
        worker.start()


if __name__ == "__main__":
    main()
