"""`python -m service.client` run as a real subprocess against the real service: submit with a progress bar and
a download, status, list, cancel, delete, API keys, problems, and an event stream that resumes after its
connection is cut (through a TCP proxy the test controls)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import av
import httpx
import pytest
from service_harness import JOB_TIMEOUT, KEY_A, KEY_B, MAIN_SETTINGS, REPO, Media, Stack, make_stack

from service.problems import PROBLEMS

QUEUED_ONLY = ["--variant", "small_16k"]  # no worker serves it here: the job stays queued


@pytest.fixture(scope="module")
def client_stack(redis_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with make_stack(redis_server, tmp_path_factory.mktemp("client"), "client", 13, MAIN_SETTINGS).running(1) as stack:
        yield stack


def client(
    url: str, *args: str, key: str | None = KEY_A, cwd: Path = REPO, timeout: float = JOB_TIMEOUT
) -> subprocess.CompletedProcess:
    env = {name: value for name, value in os.environ.items() if not name.startswith("MMAUDIO_")}
    env["MMAUDIO_URL"] = url
    if key is not None:
        env["MMAUDIO_API_KEY"] = key
    return subprocess.run(
        [sys.executable, "-m", "service.client", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_submit_waits_with_a_progress_bar_and_writes_a_playable_mp4(
    client_stack: Stack, media: Media, tmp_path: Path
) -> None:
    out = tmp_path / "waves.mp4"
    run = client(
        client_stack.url, "submit", str(media.video), "--prompt", "waves", "--steps", "5", "--seed", "77",
        "--wait", "--out", str(out),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(out)
    assert "sampling" in run.stderr and "5/5" in run.stderr  # the bar went through the steps
    assert "seed 77" in run.stderr and "random weights" in run.stderr
    with av.open(str(out)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        assert audio.codec_context.name == "aac"
        assert abs(float(video.duration * video.time_base) - 1.6) < 0.1
        assert sum(frame.samples for frame in container.decode(audio)) / audio.rate == pytest.approx(1.6, abs=0.1)


def test_status_list_cancel_and_text_jobs(client_stack: Stack, tmp_path: Path) -> None:
    run = client(client_stack.url, "submit", "--text", "--prompt", "rain on a tin roof", *QUEUED_ONLY)
    assert run.returncode == 0, run.stderr
    job_id = run.stdout.strip()

    status = client(client_stack.url, "status", job_id)
    assert status.returncode == 0, status.stderr
    assert '"status": "queued"' in status.stdout and '"prompt": "rain on a tin roof"' in status.stdout

    listing = client(client_stack.url, "list", "--status", "queued")
    assert listing.returncode == 0, listing.stderr
    assert any(line.startswith(f"{job_id}  queued") for line in listing.stdout.splitlines())

    canceled = client(client_stack.url, "cancel", job_id)
    assert (canceled.returncode, canceled.stdout.strip()) == (0, "canceled")
    again = client(client_stack.url, "cancel", job_id)  # canceling twice is fine
    assert again.returncode == 0
    assert job_id not in client(client_stack.url, "list", "--status", "queued").stdout

    flac = client(
        client_stack.url, "submit", "--text", "--prompt", "rain", "--duration", "1.5", "--steps", "2",
        "--num-samples", "2", "--wait", "--out", str(tmp_path / "rain.flac"),
    )  # fmt: skip
    assert flac.returncode == 0, flac.stderr
    for sample in (0, 1):
        with av.open(str(tmp_path / f"rain-{sample}.flac")) as container:
            stream = container.streams.audio[0]
            assert sum(frame.samples for frame in container.decode(stream)) / stream.rate == pytest.approx(1.5)


def test_api_keys_and_problems(client_stack: Stack, media: Media) -> None:
    missing = client(client_stack.url, "list", key=None)
    assert missing.returncode == 1
    assert PROBLEMS["unauthorized"].title in missing.stderr

    run = client(client_stack.url, "--api-key", KEY_B, "submit", "--text", *QUEUED_ONLY, key="not-a-key")
    assert run.returncode == 0, run.stderr  # --api-key wins over MMAUDIO_API_KEY
    job_id = run.stdout.strip()
    assert client(client_stack.url, "status", job_id, "--api-key", KEY_B).returncode == 0
    others = client(client_stack.url, "status", job_id)  # alice cannot see bob's job
    assert others.returncode == 1
    assert PROBLEMS["not-found"].title in others.stderr and job_id in others.stderr
    assert client(client_stack.url, "cancel", job_id, "--api-key", KEY_B).returncode == 0

    bad = client(client_stack.url, "submit", str(media.text), "--wait")
    assert bad.returncode == 1
    assert PROBLEMS["unreadable-media"].title in bad.stderr and "not a readable video" in bad.stderr
    invalid = client(client_stack.url, "submit", "--text", "--steps", "100000")
    assert invalid.returncode == 1
    assert PROBLEMS["validation-error"].title in invalid.stderr and "num_steps" in invalid.stderr
    unreachable = client("http://127.0.0.1:9", "list")
    assert unreachable.returncode == 1 and "Cannot reach" in unreachable.stderr


def test_delete(client_stack: Stack) -> None:
    paths = httpx.get(f"{client_stack.url}/openapi.json").json()["paths"]
    if "delete" not in paths["/v1/jobs/{job_id}"]:
        pytest.skip("DELETE /v1/jobs/{id} is not served by this branch yet (issue 11, item 4)")
    job_id = client(client_stack.url, "submit", "--text", *QUEUED_ONLY).stdout.strip()
    deleted = client(client_stack.url, "delete", job_id)
    assert (deleted.returncode, deleted.stdout.strip()) == (0, f"deleted {job_id}"), deleted.stderr
    gone = client(client_stack.url, "status", job_id)
    assert gone.returncode == 1 and PROBLEMS["not-found"].title in gone.stderr


class CuttingProxy:
    """A TCP proxy in front of the API that cuts the connection of the first event stream as soon as the API
    sends it a progress event (which never reaches the client), and records every request head."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.heads: list[str] = []
        self.cut = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pump, args=(downstream, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, downstream, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        with contextlib.suppress(OSError):  # either side may already be gone
            while chunk := source.recv(65536):
                if from_client and b"\r\n\r\n" in chunk:
                    self.heads.append(chunk.split(b"\r\n\r\n")[0].decode("latin-1"))
                if not from_client and not self.cut.is_set() and b"event: progress" in chunk:
                    self.cut.set()
                    break
                sink.sendall(chunk)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()

    def close(self) -> None:
        self.listener.close()


def test_a_cut_event_stream_resumes_with_last_event_id(client_stack: Stack, media: Media, tmp_path: Path) -> None:
    proxy = CuttingProxy(client_stack.port)
    try:
        out = tmp_path / "resumed.flac"
        run = client(
            f"http://127.0.0.1:{proxy.port}", "submit", str(media.video), "--steps", "20", "--format", "flac",
            "--wait", "--out", str(out),
        )  # fmt: skip
    finally:
        proxy.close()
    assert run.returncode == 0, run.stderr
    assert proxy.cut.is_set()
    streams = [head for head in proxy.heads if "/events " in head.split("\r\n")[0]]
    assert len(streams) >= 2, proxy.heads
    assert "last-event-id" not in streams[0].lower()
    resumed = [line for line in streams[1].split("\r\n") if line.lower().startswith("last-event-id:")]
    assert resumed and int(resumed[0].split(":")[1]) >= 1
    assert "succeeded" in run.stderr and out.stat().st_size > 0
    with av.open(str(out)) as container:
        assert container.streams.audio[0].codec_context.name == "flac"
