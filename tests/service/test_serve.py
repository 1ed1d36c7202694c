"""`python -m service`: one command starts redis-server, a worker and the API, and stops them all (Redis last, without
a traceback) on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
from service_harness import CLIENT_TIMEOUT, QUICK, REPO, START_TIMEOUT, WAIT, child_pids, wait_until

from model.testkit import free_port


def children(pid: int) -> list[int]:
    return [
        int(child) for task in Path(f"/proc/{pid}/task").iterdir() for child in (task / "children").read_text().split()
    ]


def test_one_command_serves_and_stops(tmp_path: Path) -> None:
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("MMAUDIO_")}
    env |= {
        "MMAUDIO_WEIGHTS": "tiny",
        "MMAUDIO_HOST": "127.0.0.1",
        "MMAUDIO_PORT": str(port),
        "MMAUDIO_REDIS_PORT": str(free_port()),
        "MMAUDIO_DATA_DIR": str(tmp_path / "data"),
    }
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
