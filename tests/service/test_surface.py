"""What integrators expect of a generation API, end to end over real HTTP with real Redis and workers: inputs by
URL (fetched from local HTTP servers started here), DELETE, Cancel-After deadlines, webhook events and the output
sample rate."""

from __future__ import annotations

import io
import itertools
import json
import math
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import av
import httpx
import pytest
from redis import Redis
from service_harness import (
    CLIENT_TIMEOUT,
    MAIN_SETTINGS,
    QUICK,
    SLOW,
    WAIT,
    Media,
    Stack,
    WebhookReceiver,
    make_stack,
    signed_with_test_secret,
    wait_for_sampling,
    wait_for_status,
    wait_until,
)

from service import keys, queue

PROBLEM = "urn:mmaudio:problem:"
FETCH_DATABASE = 12
FETCH_TIMEOUT_SECONDS = 2.0
FETCH_MAX_REDIRECTS = 2
ENDED = {"succeeded", "failed", "canceled"}


class FileServer:
    """A local HTTP server with the good and bad answers a `video_url` may meet."""

    def __init__(self, video: Path, limit: int) -> None:
        payload = video.read_bytes()
        server_ref = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # bodies end with the connection: no length needed

            def do_GET(self) -> None:
                server_ref.paths.append(self.path)
                route = self.path.split("?")[0]
                if route == "/clip.mp4":
                    self._answer(200, payload, {"Content-Length": str(len(payload)), "Content-Type": "video/mp4"})
                elif route == "/moved":
                    self._answer(302, b"", {"Location": "/clip.mp4"})
                elif route == "/loop":
                    self._answer(302, b"", {"Location": "/loop"})
                elif route == "/bad-redirect":
                    self._answer(302, b"", {"Location": "http://[::1"})
                elif route == "/to-file":
                    self._answer(302, b"", {"Location": "file:///etc/passwd"})
                elif route == "/declared-huge":
                    self._answer(200, b"", {"Content-Length": str(limit + 1)})
                elif route == "/undeclared-huge":
                    self.send_response(200)
                    self.end_headers()
                    chunk = b"\0" * (1 << 16)
                    try:
                        for _ in range(limit // len(chunk) + 2):
                            self.wfile.write(chunk)
                    except OSError:  # the API stopped reading at the limit
                        pass
                elif route == "/slow":
                    self.send_response(200)
                    self.end_headers()
                    try:
                        for _ in range(40):
                            self.wfile.write(b"\0")
                            self.wfile.flush()
                            time.sleep(0.25)
                    except OSError:
                        pass
                else:
                    self._answer(404, b"not here", {"Content-Length": "8"})

            def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.paths: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="module")
def files(media: Media) -> Iterator[FileServer]:
    server = FileServer(media.video, int(MAIN_SETTINGS["MMAUDIO_MAX_UPLOAD_BYTES"]))
    yield server
    server.close()


@pytest.fixture(scope="module")
def fetching(redis_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """A deployment that may fetch from private addresses (the local file server), with one worker."""
    settings = MAIN_SETTINGS | {
        "MMAUDIO_API_KEYS": "",
        "MMAUDIO_FETCH_ALLOW_PRIVATE": "true",
        "MMAUDIO_FETCH_TIMEOUT_SECONDS": str(FETCH_TIMEOUT_SECONDS),
        "MMAUDIO_FETCH_MAX_REDIRECTS": str(FETCH_MAX_REDIRECTS),
    }
    stack = make_stack(redis_server, tmp_path_factory.mktemp("fetching"), "fetching", FETCH_DATABASE, settings)
    with stack.running(1), httpx.Client(base_url=stack.url, timeout=CLIENT_TIMEOUT) as client:
        yield client


def problem_type(response: httpx.Response) -> str:
    assert response.headers["content-type"] == "application/problem+json", response.text
    return response.json()["type"].removeprefix(PROBLEM)


# --- inputs by URL ------------------------------------------------------------------------------------------------


def test_a_video_url_is_fetched_probed_and_generated_for(fetching: httpx.Client, files: FileServer) -> None:
    url = f"{files.url}/moved"  # one redirect, to /clip.mp4
    answer = fetching.post("/v1/jobs", json=QUICK | {"video_url": url, "prompt": "rain"})
    assert answer.status_code == 202, answer.text
    job = answer.json()
    assert job["input"]["kind"] == "video" and job["input"]["url"] == url
    assert job["input"]["filename"] == "clip.mp4" and job["input"]["media"]["width"] == 320
    assert job["params"]["output_format"] == "mp4"
    done = wait_for_status(fetching, job["id"], ENDED)
    assert done["status"] == "succeeded", done["error"]
    mp4 = fetching.get(f"/v1/jobs/{job['id']}/result")
    with av.open(io.BytesIO(mp4.content)) as container:
        assert container.streams.video[0].width == 320 and container.streams.audio


@pytest.mark.parametrize(
    ("path", "slug", "status"),
    [
        ("/loop", "url-redirects", 422),
        ("/to-file", "url-forbidden", 422),  # every hop is checked again: a redirect to file:// is refused
        ("/bad-redirect", "url-unreachable", 422),  # httpx refuses the answer's Location
        ("/declared-huge", "url-too-large", 413),
        ("/undeclared-huge", "url-too-large", 413),  # counted while streaming
        ("/slow", "url-timeout", 422),
        ("/missing", "url-unreachable", 422),
    ],
)
def test_bad_urls_are_refused_at_submit(
    fetching: httpx.Client, files: FileServer, path: str, slug: str, status: int
) -> None:
    started = time.monotonic()
    answer = fetching.post("/v1/jobs", json=QUICK | {"video_url": files.url + path})
    assert answer.status_code == status and problem_type(answer) == slug, answer.text
    assert time.monotonic() - started < FETCH_TIMEOUT_SECONDS + 10
    if path == "/loop":
        assert files.paths.count("/loop") >= FETCH_MAX_REDIRECTS + 1


def test_unreachable_and_image_urls(fetching: httpx.Client, files: FileServer, media: Media) -> None:
    closed = fetching.post("/v1/jobs", json=QUICK | {"video_url": "http://127.0.0.1:9/clip.mp4"})
    assert closed.status_code == 422 and problem_type(closed) == "url-unreachable"
    # a video fetched as an image is probed like an upload in the image field
    wrong = fetching.post("/v1/jobs", json=QUICK | {"image_url": f"{files.url}/clip.mp4"})
    assert wrong.status_code in (415, 422) and problem_type(wrong) not in ("url-unreachable", "url-forbidden")
    both = fetching.post("/v1/jobs", json=QUICK | {"video_url": f"{files.url}/a", "image_url": f"{files.url}/b"})
    assert both.status_code == 422


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/clip.mp4",
        "http://localhost:{port}/clip.mp4",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/clip.mp4",
        "http://[::1]:{port}/clip.mp4",
    ],
)
def test_private_addresses_are_forbidden_by_default(alice: httpx.Client, files: FileServer, url: str) -> None:
    port = files.url.rsplit(":", 1)[1]
    before = len(files.paths)
    answer = alice.post("/v1/jobs", json=QUICK | {"video_url": url.format(port=port)})
    assert answer.status_code == 422 and problem_type(answer) == "url-forbidden", answer.text
    assert len(files.paths) == before  # refused before any connection


# --- DELETE -------------------------------------------------------------------------------------------------------


def stored_keys(redis: Redis, job_id: str) -> list[bytes]:
    return [*redis.keys(keys.blob(f"results/{job_id}/*")), *redis.keys(keys.blob(f"uploads/{job_id}*"))]


def test_delete_removes_a_finished_job_for_everyone(
    stack: Stack, alice: httpx.Client, bob: httpx.Client, media: Media
) -> None:
    redis = Redis.from_url(stack.env["MMAUDIO_REDIS_URL"])
    with media.video.open("rb") as handle:
        job = alice.post("/v1/jobs", files={"video": handle}, data={"duration": "1", "num_steps": "1"}).json()
    done = wait_for_status(alice, job["id"], ENDED)
    assert done["status"] == "succeeded"
    assert alice.get(f"/v1/jobs/{job['id']}/result", params={"format": "wav"}).status_code == 200  # converted
    assert len(stored_keys(redis, job["id"])) == 3  # mp4, flac, wav

    # another key cannot delete it, nor learn that it exists
    refused = bob.delete(f"/v1/jobs/{job['id']}")
    assert refused.status_code == 404 and problem_type(refused) == "not-found"
    assert alice.get(f"/v1/jobs/{job['id']}").status_code == 200

    assert alice.delete(f"/v1/jobs/{job['id']}").status_code == 204
    for path in ("", "/events", "/result"):
        gone = alice.get(f"/v1/jobs/{job['id']}{path}")
        assert gone.status_code == 404 and problem_type(gone) == "not-found"
    assert job["id"] not in [listed["id"] for listed in alice.get("/v1/jobs", params={"limit": 100}).json()["jobs"]]
    assert stored_keys(redis, job["id"]) == [] and not redis.exists(keys.job(job["id"]))
    assert alice.delete(f"/v1/jobs/{job['id']}").status_code == 404


def test_delete_withdraws_a_queued_job(stack: Stack, alice: httpx.Client) -> None:
    redis = Redis.from_url(stack.env["MMAUDIO_REDIS_URL"])
    job = alice.post("/v1/jobs", json=QUICK | {"variant": "small_16k"}).json()  # no worker serves small_16k
    assert queue.position(redis, "small_16k", job["id"], 1, scan=1000) is not None
    assert alice.delete(f"/v1/jobs/{job['id']}").status_code == 204
    assert queue.position(redis, "small_16k", job["id"], 1, scan=1000) is None
    assert alice.get(f"/v1/jobs/{job['id']}").status_code == 404


def test_deleting_a_running_job_leaves_nothing_behind(stack: Stack, alice: httpx.Client) -> None:
    redis = Redis.from_url(stack.env["MMAUDIO_REDIS_URL"])
    job = alice.post("/v1/jobs", json=SLOW).json()
    wait_for_sampling(alice, job["id"])
    assert alice.delete(f"/v1/jobs/{job['id']}").status_code == 204
    # the worker stops at its next step and writes nothing: the job stays gone and no result appears
    wait_until(lambda: job["id"] not in json.dumps(stack_jobs_held(redis)), 60, "the worker to drop the job")
    time.sleep(1.0)
    assert not redis.exists(keys.job(job["id"])) and stored_keys(redis, job["id"]) == []
    assert alice.get(f"/v1/jobs/{job['id']}").status_code == 404
    after = alice.post("/v1/jobs", json=QUICK, headers=WAIT).json()
    assert wait_for_status(alice, after["id"], ENDED)["status"] == "succeeded"


def stack_jobs_held(redis: Redis) -> list[str]:
    """Ids of the jobs the live workers hold (from their heartbeats)."""
    held = []
    for key in redis.keys(keys.worker("*")):
        info = redis.get(key)
        if info:
            held += json.loads(info).get("jobs", [])
    return held


# --- Cancel-After -------------------------------------------------------------------------------------------------


def test_a_queued_job_past_its_deadline_never_starts(alice: httpx.Client) -> None:
    submitted = time.time()
    job = alice.post("/v1/jobs", json=QUICK | {"variant": "small_16k"}, headers={"Cancel-After": "1s"}).json()
    deadline = datetime.fromisoformat(job["deadline"]).timestamp()
    assert submitted <= deadline - 1 <= time.time()
    ended = wait_for_status(alice, job["id"], ENDED, timeout=30)
    assert ended["status"] == "canceled" and ended["started_at"] is None and ended["attempts"] == 0
    assert ended["error"]["type"] == PROBLEM + "deadline-exceeded"


def test_a_running_job_past_its_deadline_is_canceled(alice: httpx.Client) -> None:
    job = alice.post("/v1/jobs", json=SLOW, headers={"Cancel-After": "3"}).json()
    ended = wait_for_status(alice, job["id"], ENDED)
    assert ended["status"] == "canceled", ended
    assert ended["error"]["type"] == PROBLEM + "deadline-exceeded"
    if ended["started_at"] is not None:  # it ran, and was stopped at its deadline
        finished = datetime.fromisoformat(ended["finished_at"]).timestamp()
        assert finished - datetime.fromisoformat(ended["deadline"]).timestamp() < 30
    assert alice.get(f"/v1/jobs/{job['id']}/result").status_code == 404


@pytest.mark.parametrize("value", ["soon", "-5", "0", "1e3", "90x", "nan", "25h", "2m30s", ""])
def test_cancel_after_garbage_is_a_problem(alice: httpx.Client, value: str) -> None:
    answer = alice.post("/v1/jobs", json=QUICK, headers={"Cancel-After": value})
    assert answer.status_code == 422 and problem_type(answer) == "validation-error", answer.text
    assert "Cancel-After" in answer.json()["detail"]


def test_cancel_after_units(alice: httpx.Client) -> None:
    for value, seconds in (("90", 90), ("2m", 120), ("1h", 3600)):
        job = alice.post("/v1/jobs", json=QUICK | {"variant": "small_16k"}, headers={"Cancel-After": value}).json()
        created = datetime.fromisoformat(job["created_at"]).timestamp()
        assert math.isclose(datetime.fromisoformat(job["deadline"]).timestamp() - created, seconds, abs_tol=1e-3)
        assert alice.delete(f"/v1/jobs/{job['id']}").status_code == 204


# --- webhook events -----------------------------------------------------------------------------------------------


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    server = WebhookReceiver()
    yield server
    server.close()


def test_webhook_events_started_progress_completed(alice: httpx.Client, receiver: WebhookReceiver) -> None:
    events = ["started", "progress", "completed"]
    params = {"duration": 2.0, "num_steps": 60, "webhook_url": receiver.url, "webhook_events": events}
    job = alice.post("/v1/jobs", json=params).json()
    assert job["webhook"]["events"] == events
    assert wait_for_status(alice, job["id"], ENDED)["status"] == "succeeded"
    wait_until(
        lambda: any(json.loads(body)["type"] == "job.succeeded" for _, body in receiver.requests), 60, "completed"
    )
    bodies = [json.loads(body) for _, body in receiver.requests]
    types = [body["type"] for body in bodies]
    assert types[0] == "job.started" and types[-1] == "job.succeeded", types
    assert types.count("job.started") == 1 and types.count("job.succeeded") == 1
    progress = [body for body in bodies if body["type"] == "job.progress"]
    assert progress, types
    assert all(body["data"]["id"] == job["id"] for body in bodies)
    assert bodies[0]["data"]["status"] == "running" and all(p["data"]["status"] == "running" for p in progress)
    # throttled: at most one per MMAUDIO_WEBHOOK_PROGRESS_INTERVAL_SECONDS (0.5 s in the test deployment)
    times = [datetime.fromisoformat(p["timestamp"]).timestamp() for p in progress]
    interval = float(MAIN_SETTINGS["MMAUDIO_WEBHOOK_PROGRESS_INTERVAL_SECONDS"])
    assert all(later - earlier >= interval * 0.95 for earlier, later in itertools.pairwise(times))
    ids = [headers["webhook-id"] for headers, _ in receiver.requests]
    assert len(set(ids)) == len(ids)  # each event is its own message
    assert all(signed_with_test_secret(headers, body) for headers, body in receiver.requests)


def test_webhook_events_default_to_completed(alice: httpx.Client, receiver: WebhookReceiver) -> None:
    job = alice.post("/v1/jobs", json=QUICK | {"webhook_url": receiver.url}).json()
    assert job["webhook"]["events"] == ["completed"] and job["webhook"]["status"] == "pending"
    wait_until(lambda: receiver.requests, 60, "the completed webhook")
    time.sleep(0.5)
    assert [json.loads(body)["type"] for _, body in receiver.requests] == ["job.succeeded"]


def test_webhook_events_are_validated(alice: httpx.Client, receiver: WebhookReceiver) -> None:
    for params in (
        {"webhook_events": ["started"]},  # no webhook_url
        {"webhook_url": receiver.url, "webhook_events": ["exploded"]},
        {"webhook_url": receiver.url, "webhook_events": []},
    ):
        answer = alice.post("/v1/jobs", json=QUICK | params)
        assert answer.status_code == 422 and problem_type(answer) == "validation-error", answer.text


# --- sample rate --------------------------------------------------------------------------------------------------


def decoded_audio(content: bytes) -> tuple[int, int]:
    """(sample rate, samples per channel) of an audio file."""
    with av.open(io.BytesIO(content)) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        return stream.rate, samples


def test_results_at_48_khz(alice: httpx.Client, media: Media) -> None:
    params = {"duration": 1.0, "num_steps": 2, "seed": 7, "prompt": "birds"}
    native = alice.post("/v1/jobs", json=params, headers=WAIT).json()
    resampled = alice.post("/v1/jobs", json=params | {"sample_rate": 48000}, headers=WAIT).json()
    native = wait_for_status(alice, native["id"], ENDED)
    resampled = wait_for_status(alice, resampled["id"], ENDED)
    assert native["params"]["sample_rate"] == 44100 and resampled["params"]["sample_rate"] == 48000
    assert resampled["result"]["sample_rate"] == 48000

    rate, samples = decoded_audio(alice.get(f"/v1/jobs/{native['id']}/result?format=flac").content)
    assert rate == 44100
    rate48, samples48 = decoded_audio(alice.get(f"/v1/jobs/{resampled['id']}/result?format=flac").content)
    assert rate48 == 48000 and samples48 == math.ceil(samples * 48000 / 44100)
    rate_wav, samples_wav = decoded_audio(alice.get(f"/v1/jobs/{resampled['id']}/result?format=wav").content)
    assert (rate_wav, samples_wav) == (48000, samples48)

    with media.video.open("rb") as handle:
        video = alice.post(
            "/v1/jobs", files={"video": handle}, data={"duration": "1", "num_steps": "1", "sample_rate": "48000"}
        ).json()
    assert wait_for_status(alice, video["id"], ENDED)["status"] == "succeeded"
    mp4 = alice.get(f"/v1/jobs/{video['id']}/result").content
    with av.open(io.BytesIO(mp4)) as container:
        assert container.streams.audio[0].rate == 48000  # the mp4's AAC follows the requested rate
    m4a_rate, _ = decoded_audio(alice.get(f"/v1/jobs/{video['id']}/result?format=m4a").content)
    assert m4a_rate == 48000


def test_other_sample_rates_are_refused(alice: httpx.Client) -> None:
    for rate in (22050, 16000, 0, "fast"):
        answer = alice.post("/v1/jobs", json=QUICK | {"sample_rate": rate})
        assert answer.status_code == 422 and problem_type(answer) == "validation-error", answer.text
    small = alice.post("/v1/jobs", json=QUICK | {"variant": "small_16k", "sample_rate": 16000})
    assert small.status_code == 202 and small.json()["params"]["sample_rate"] == 16000
    assert alice.delete(f"/v1/jobs/{small.json()['id']}").status_code == 204
