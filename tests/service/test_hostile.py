"""Hostile requests over real HTTP: every one is answered with a 4xx problem+json or a success, never a 5xx,
and afterwards a normal job still succeeds on the same worker process."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import keyed_client
from redis import Redis
from service_harness import JOB_TIMEOUT, KEY_A, KEY_B, QUICK, WAIT, Media, Stack, wait_for_status, wait_until

from model.testkit import make_video
from service import queue

JSON = {"Content-Type": "application/json"}
BOUNDARY = "hostile-boundary"
FORM = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
QUICK_FIELDS = "".join(
    f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n' for name, value in QUICK.items()
)


def multipart(*parts: str, close: bool = True) -> bytes:
    return (QUICK_FIELDS + "".join(parts) + (f"--{BOUNDARY}--\r\n" if close else "")).encode()


def text_part(name: str, value: str) -> str:
    return f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'


def quick(**fields: Any) -> bytes:
    return json.dumps({**QUICK, **fields}).encode()


@dataclass(frozen=True)
class Hostile:
    name: str
    method: str
    path: str  # "{job}" is a finished job of alice's, "{media:NAME}" in content a file of the media fixture
    statuses: frozenset[int]
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] | list[tuple[str, str]] | None = None
    file: tuple[str, str] | None = None  # (field, media attribute or EXTRA_MEDIA name): a real upload
    form: dict[str, str] = field(default_factory=dict)  # more fields sent with that upload
    key: str | None = KEY_A


def case(name: str, method: str, path: str, statuses: int | set[int], **kwargs: Any) -> Hostile:
    codes = frozenset({statuses} if isinstance(statuses, int) else statuses)
    return Hostile(name, method, path, codes, **kwargs)


SUBMIT = "/v1/jobs"
CASES = [
    # --- JSON bodies ---------------------------------------------------------------------------------------------
    case("lone surrogate", "POST", SUBMIT, 422, content=b'{"prompt": "a\\ud800b"}', headers=JSON),
    case("surrogate in a key", "POST", SUBMIT, 422, content=b'{"\\udc00": 1}', headers=JSON),
    case(
        "deep nesting",
        "POST",
        SUBMIT,
        422,
        content=b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        headers=JSON,
    ),
    case("not an object", "POST", SUBMIT, 422, content=b'"just a string"', headers=JSON),
    case("null body", "POST", SUBMIT, 422, content=b"null", headers=JSON),
    case("truncated json", "POST", SUBMIT, 422, content=b'{"prompt": "x"', headers=JSON),
    case("invalid utf-8", "POST", SUBMIT, 422, content=b'{"prompt": "\xff\xfe"}', headers=JSON),
    case("NaN duration", "POST", SUBMIT, 422, content=b'{"duration": NaN, "num_steps": 1}', headers=JSON),
    case("infinite duration", "POST", SUBMIT, 422, content=b'{"duration": Infinity, "num_steps": 1}', headers=JSON),
    case("huge duration", "POST", SUBMIT, 422, content=quick(duration=1e308), headers=JSON),
    case("negative duration", "POST", SUBMIT, 422, content=quick(duration=-1), headers=JSON),
    case("fractional steps", "POST", SUBMIT, 422, content=quick(num_steps=2.5), headers=JSON),
    # --- inputs by URL, deadlines, webhook events, sample rate -------------------------------------------------
    case("url to loopback", "POST", SUBMIT, 422, content=quick(video_url="http://127.0.0.1:9/a.mp4"), headers=JSON),
    case("url to localhost", "POST", SUBMIT, 422, content=quick(video_url="http://localhost/a.mp4"), headers=JSON),
    case("url to metadata", "POST", SUBMIT, 422, content=quick(image_url="http://169.254.169.254/x"), headers=JSON),
    case("url to ipv6 loopback", "POST", SUBMIT, 422, content=quick(video_url="http://[::1]/a"), headers=JSON),
    case("url not http", "POST", SUBMIT, 422, content=quick(video_url="file:///etc/passwd"), headers=JSON),
    case("url bad port", "POST", SUBMIT, 422, content=quick(video_url="http://example.com:99999/a"), headers=JSON),
    case("url not a string", "POST", SUBMIT, 422, content=quick(video_url=["http://example.com/a"]), headers=JSON),
    case("url and file", "POST", SUBMIT, 422, file=("video", "video"), form={"video_url": "http://example.com/a"}),
    case("cancel-after garbage", "POST", SUBMIT, 422, content=quick(), headers=JSON | {"Cancel-After": "soon"}),
    case("cancel-after negative", "POST", SUBMIT, 422, content=quick(), headers=JSON | {"Cancel-After": "-5"}),
    case("cancel-after huge", "POST", SUBMIT, 422, content=quick(), headers=JSON | {"Cancel-After": "9" * 400}),
    case("webhook events alone", "POST", SUBMIT, 422, content=quick(webhook_events=["started"]), headers=JSON),
    case("sample rate odd", "POST", SUBMIT, 422, content=quick(sample_rate=22050), headers=JSON),
    case("sample rate huge", "POST", SUBMIT, 422, content=quick(sample_rate=10**30), headers=JSON),
    case("steps as text", "POST", SUBMIT, 422, content=quick(num_steps="many"), headers=JSON),
    case("zero steps", "POST", SUBMIT, 422, content=quick(num_steps=0), headers=JSON),
    case("astronomic steps", "POST", SUBMIT, 422, content=quick(num_steps=10**30), headers=JSON),
    case("cfg as text", "POST", SUBMIT, 422, content=quick(cfg_strength="strong"), headers=JSON),
    case("huge seed", "POST", SUBMIT, 422, content=quick(seed=2**80), headers=JSON),
    case("zero samples", "POST", SUBMIT, 422, content=quick(num_samples=0), headers=JSON),
    case("too many samples", "POST", SUBMIT, 422, content=quick(num_samples=1000), headers=JSON),
    case("unknown variant", "POST", SUBMIT, 422, content=quick(variant="huge_96k"), headers=JSON),
    case("unknown format", "POST", SUBMIT, 422, content=quick(output_format="exe"), headers=JSON),
    case("mp4 without video", "POST", SUBMIT, 422, content=quick(output_format="mp4"), headers=JSON),
    case("prompt too long", "POST", SUBMIT, 422, content=quick(prompt="x" * 5000), headers=JSON),
    case("prompt as list", "POST", SUBMIT, 422, content=quick(prompt=["a", "b"]), headers=JSON),
    case("prompt with NUL", "POST", SUBMIT, {202, 422}, content=quick(prompt="a\u0000b"), headers=JSON),
    case("webhook not http", "POST", SUBMIT, 422, content=quick(webhook_url="ftp://example.com/x"), headers=JSON),
    case("webhook garbage", "POST", SUBMIT, 422, content=quick(webhook_url="http://[::1"), headers=JSON),
    case("webhook huge", "POST", SUBMIT, 422, content=quick(webhook_url="https://e.com/" + "a" * 10000), headers=JSON),
    case("json over 1 MiB", "POST", SUBMIT, 413, content=quick(prompt="x" * (2 << 20)), headers=JSON),
    # --- multipart -----------------------------------------------------------------------------------------------
    case("no boundary", "POST", SUBMIT, 415, content=b"whatever", headers={"Content-Type": "multipart/form-data"}),
    case("garbage multipart", "POST", SUBMIT, 422, content=b"\x00\x01garbage" * 100, headers=FORM),
    case("unclosed multipart", "POST", SUBMIT, 422, content=multipart(close=False), headers=FORM),
    case(
        "field twice",
        "POST",
        SUBMIT,
        422,
        content=multipart(text_part("prompt", "a"), text_part("prompt", "b")),
        headers=FORM,
    ),
    case("field too long", "POST", SUBMIT, 422, content=multipart(text_part("prompt", "x" * (70 << 10))), headers=FORM),
    case(
        "part without name",
        "POST",
        SUBMIT,
        422,
        content=multipart(f"--{BOUNDARY}\r\nContent-Type: text/plain\r\n\r\nx\r\n"),
        headers=FORM,
    ),
    case(
        "file in other field",
        "POST",
        SUBMIT,
        422,
        content=multipart(
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="audio"; filename="a.mp4"\r\n\r\ndata\r\n'
        ),
        headers=FORM,
    ),
    case("steps as words", "POST", SUBMIT, 422, content=multipart(text_part("num_steps", "ten")), headers=FORM),
    case("text as video", "POST", SUBMIT, 415, file=("video", "text")),
    case("empty video", "POST", SUBMIT, 422, file=("video", "empty")),
    case("truncated video", "POST", SUBMIT, 422, file=("video", "truncated")),
    case("audio-only video", "POST", SUBMIT, 415, file=("video", "audio_only")),
    case("unknown codec", "POST", SUBMIT, 415, file=("video", "unknown_codec")),
    case("too long video", "POST", SUBMIT, 422, file=("video", "too_long")),
    case("too wide video", "POST", SUBMIT, 422, file=("video", "too_wide")),
    case("too short video", "POST", SUBMIT, 422, file=("video", "too_short")),
    case("text as image", "POST", SUBMIT, 415, file=("image", "text")),
    case("still image as video", "POST", SUBMIT, 415, file=("video", "image")),
    case("vp8 into mp4", "POST", SUBMIT, 415, file=("video", "vp8")),
    case("vp8 for its audio", "POST", SUBMIT, 202, file=("video", "vp8"), form={"output_format": "flac"}),
    case("bytes after the movie", "POST", SUBMIT, 202, file=("video", "padded")),
    case("raw stream too long", "POST", SUBMIT, 422, file=("video", "raw_long")),
    case("raw stream into mp4", "POST", SUBMIT, 415, file=("video", "raw")),
    case("raw stream for its audio", "POST", SUBMIT, 202, file=("video", "raw"), form={"output_format": "wav"}),
    # --- headers -------------------------------------------------------------------------------------------------
    case("no content type", "POST", SUBMIT, 415, content=b"{}"),
    case("text/plain body", "POST", SUBMIT, 415, content=b"prompt=x", headers={"Content-Type": "text/plain"}),
    case(
        "odd charset",
        "POST",
        SUBMIT,
        {202, 415, 422},
        content=quick(),
        headers={"Content-Type": "application/json; charset=latin-1"},
    ),
    case("no key", "GET", SUBMIT, 401, key=None),
    case("wrong key", "GET", SUBMIT, 401, key="not-a-key"),
    case("huge key", "GET", SUBMIT, 401, key="k" * 20000),
    case("basic auth", "GET", SUBMIT, 401, key=None, headers={"Authorization": "Basic YTpi"}),
    case("odd prefer", "POST", SUBMIT, {200, 202}, content=quick(), headers={**JSON, "Prefer": "wait=soon"}),
    case("negative prefer", "POST", SUBMIT, {200, 202}, content=quick(), headers={**JSON, "Prefer": "wait=-5"}),
    case(
        "long idempotency key",
        "POST",
        SUBMIT,
        {200, 202, 422},
        content=quick(),
        headers={**JSON, "Idempotency-Key": "i" * 5000},
    ),
    case("garbled event id", "GET", "/v1/jobs/{job}/events", 200, headers={"Last-Event-ID": "not-a-revision"}),
    case("events of a stranger", "GET", "/v1/jobs/{job}/events", 404, key=KEY_B),
    # --- query parameters and paths ------------------------------------------------------------------------------
    case("zero limit", "GET", SUBMIT, 422, params={"limit": "0"}),
    case("negative limit", "GET", SUBMIT, 422, params={"limit": "-3"}),
    case("limit as text", "GET", SUBMIT, 422, params={"limit": "all"}),
    case("huge limit", "GET", SUBMIT, {200, 422}, params={"limit": str(10**20)}),
    case("NaN cursor", "GET", SUBMIT, 422, params={"before": "nan"}),
    case("infinite cursor", "GET", SUBMIT, 422, params={"before": "inf"}),
    case("text cursor", "GET", SUBMIT, 422, params={"before": "yesterday"}),
    case("unknown status", "GET", SUBMIT, 422, params={"status": "exploded"}),
    case("very long id", "GET", "/v1/jobs/" + "a" * 5000, 404),
    case("NUL in id", "GET", "/v1/jobs/%00", 404),
    case("traversal in id", "GET", "/v1/jobs/..%2F..%2Fetc%2Fpasswd", 404),
    case("stranger's job", "GET", "/v1/jobs/{job}", 404, key=KEY_B),
    case("cancel unknown", "POST", "/v1/jobs/nope/cancel", 404),
    case("cancel finished", "POST", "/v1/jobs/{job}/cancel", 409),
    case("result format exe", "GET", "/v1/jobs/{job}/result", 422, params={"format": "exe"}),
    case("result sample huge", "GET", "/v1/jobs/{job}/result", {404, 422}, params={"sample": str(10**30)}),
    case("result sample absent", "GET", "/v1/jobs/{job}/result", 404, params={"sample": "3"}),
    case("delete collection", "DELETE", SUBMIT, 405),
    case("delete stranger's job", "DELETE", "/v1/jobs/{job}", 404, key=KEY_B),
    case("delete unknown", "DELETE", "/v1/jobs/nope", 404),
    case("delete without key", "DELETE", "/v1/jobs/{job}", 401, key=None),
    case("put a job", "PUT", "/v1/jobs/{job}", 405),
    # --- ranges --------------------------------------------------------------------------------------------------
    case("range past the end", "GET", "/v1/jobs/{job}/result", 416, headers={"Range": "bytes=999999999-"}),
    case("reversed range", "GET", "/v1/jobs/{job}/result", {200, 416}, headers={"Range": "bytes=9-2"}),
    case("range garbage", "GET", "/v1/jobs/{job}/result", {200, 416}, headers={"Range": "bytes=abc"}),
    case("multi range", "GET", "/v1/jobs/{job}/result", {200, 206, 416}, headers={"Range": "bytes=0-1,5-9"}),
    case("range other unit", "GET", "/v1/jobs/{job}/result", {200, 416}, headers={"Range": "pages=1-2"}),
]


@pytest.fixture(scope="module")
def finished_job(stack: Stack) -> str:
    with keyed_client(stack, KEY_A) as alice:
        job = alice.post("/v1/jobs", json=QUICK, headers=WAIT).json()
        assert wait_for_status(alice, job["id"], {"succeeded"})["status"] == "succeeded"
    return job["id"]


@pytest.fixture(scope="module")
def extra_media(media: Media, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("hostile-media")
    padded = folder / "padded.mp4"
    padded.write_bytes(media.video.read_bytes() + b"bytes some tool appended " * 40)
    return {
        "vp8": make_video(folder / "clip.webm", seconds=1.6, codec="libvpx"),
        "padded": padded,
        "raw": make_video(folder / "clip.h264", seconds=1.6),
        "raw_long": make_video(folder / "long.h264", seconds=25.0, size=(64, 48)),  # over MAX_VIDEO_SECONDS
    }


def send(stack: Stack, media: Media, extra: dict[str, Path], hostile: Hostile, job_id: str) -> httpx.Response:
    headers = dict(hostile.headers)
    if hostile.key is not None:
        headers["Authorization"] = f"Bearer {hostile.key}"
    url = stack.url + hostile.path.replace("{job}", job_id)
    with httpx.Client(timeout=60) as client:
        if hostile.file is not None:
            name, attribute = hostile.file
            path = extra[attribute] if attribute in extra else getattr(media, attribute)
            with path.open("rb") as handle:
                return client.request(
                    hostile.method,
                    url,
                    headers=headers,
                    files={name: (path.name, handle)},
                    data={"prompt": "x", **{k: str(v) for k, v in QUICK.items()}, **hostile.form},
                )
        if hostile.method == "GET" and url.endswith("/events"):  # a live stream: read just its answer's head
            with client.stream("GET", url, headers=headers, params=hostile.params) as response:
                return response
        return client.request(hostile.method, url, content=hostile.content, headers=headers, params=hostile.params)


def test_hostile_cases_are_distinct_and_many() -> None:
    assert len({c.name for c in CASES}) == len(CASES) >= 60


@pytest.mark.parametrize("hostile", CASES, ids=[c.name for c in CASES])
def test_hostile_request(
    stack: Stack, media: Media, extra_media: dict[str, Path], finished_job: str, hostile: Hostile
) -> None:
    if 202 in hostile.statuses:  # a case that may be accepted needs room in the (small) test queue
        redis = Redis.from_url(stack.env["MMAUDIO_REDIS_URL"])
        wait_until(lambda: queue.depth(redis, "large_44k_v2") < 2, JOB_TIMEOUT, "room in the queue")
    response = send(stack, media, extra_media, hostile, finished_job)
    assert response.status_code in hostile.statuses, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        assert response.headers["content-type"] == "application/problem+json"


def test_after_every_hostile_request_a_normal_job_succeeds(stack: Stack, alice: httpx.Client) -> None:
    pids = [worker.popen.pid for worker in stack.workers if worker.popen.poll() is None]
    job = alice.post("/v1/jobs", json=QUICK, headers=WAIT).json()
    assert wait_for_status(alice, job["id"], {"succeeded", "failed"})["status"] == "succeeded"
    assert [worker.popen.pid for worker in stack.workers if worker.popen.poll() is None] == pids
    # and what was accepted (NUL in a prompt, trailing bytes, a raw stream, VP8 for its audio) ran through
    redis = Redis.from_url(stack.env["MMAUDIO_REDIS_URL"])
    wait_until(lambda: queue.depth(redis, "large_44k_v2") == 0, JOB_TIMEOUT, "the queue to drain")
    for listed in alice.get("/v1/jobs", params={"limit": 100}).json()["jobs"]:
        if listed["status"] in ("queued", "running"):
            listed = wait_for_status(alice, listed["id"], {"succeeded", "failed", "canceled"})
        assert listed["status"] != "failed", listed["error"]
