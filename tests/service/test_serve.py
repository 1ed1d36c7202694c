"""`python -m service`: one command starts redis-server, a worker and the API, and stops them all (Redis last, without
a traceback) on Ctrl-C."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
from service_harness import CLIENT_TIMEOUT, QUICK, REPO, START_TIMEOUT, WAIT, child_pids, wait_until

from model.testkit import free_port


def serve_env(tmp_path: Path, port: int, **settings: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MMAUDIO_")}
    return env | {
        "MMAUDIO_WEIGHTS": "tiny",
        "MMAUDIO_HOST": "127.0.0.1",
        "MMAUDIO_PORT": str(port),
        "MMAUDIO_REDIS_PORT": str(free_port()),
        "MMAUDIO_DATA_DIR": str(tmp_path / "data"),
        "MMAUDIO_WORKER_STABLE_SECONDS": "1",
        **settings,
    }


def test_one_command_serves_and_stops(tmp_path: Path) -> None:
    port = free_port()
    env = serve_env(tmp_path, port)
    log = (tmp_path / "serve.log").open("wb")
    serve = subprocess.Popen(
        [sys.executable, "-m", "service"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, process_group=0
    )
    url = f"http://127.0.0.1:{port}"
    started: list[int] = []
    try:

        def ready() -> bool:
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, START_TIMEOUT, "the service to be ready", interval=0.5)
        job = httpx.post(f"{url}/v1/jobs", json=QUICK, headers=WAIT, timeout=CLIENT_TIMEOUT)
        assert job.json()["status"] == "succeeded"
        assert (tmp_path / "data" / "redis" / "appendonlydir").is_dir()  # its own redis-server, with AOF
        started = child_pids(serve.pid)
        assert len(started) == 3  # redis-server, a worker, uvicorn
    finally:
        os.killpg(serve.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole foreground process group
        assert serve.wait(60) == 0
    assert all(not Path(f"/proc/{pid}").exists() for pid in started)
    output = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in output, output


def test_launcher_fails_loudly_and_leaves_no_orphans(tmp_path: Path) -> None:
    with socket.socket() as taken:  # the API cannot bind: serve must exit non-zero, not 0
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = serve_env(tmp_path, taken.getsockname()[1], MMAUDIO_WORKERS="0", MMAUDIO_RESTART_ATTEMPTS="2")
        failed = subprocess.run([sys.executable, "-m", "service"], cwd=REPO, env=env, capture_output=True, timeout=120)
    assert failed.returncode == 1 and b"api keeps dying" in failed.stderr, failed.stderr[-2000:]

    port = free_port()
    env = serve_env(tmp_path, port, MMAUDIO_WORKERS="0")
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    serve = subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO, env=env, **quiet)

    def api_up() -> bool:
        assert serve.poll() is None, "serve exited"
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(api_up, START_TIMEOUT, "the API")
        started = child_pids(serve.pid)
        assert len(started) == 2  # redis-server and the API
    finally:
        serve.kill()  # SIGKILL: the launcher cleans up nothing itself
        serve.wait(10)
    wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in started), 30, "the children to die")
