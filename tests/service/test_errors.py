"""Every refusal is RFC 9457 problem+json with a stable type; hostile uploads never reach a worker."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from service_harness import MAIN_SETTINGS, Media, Stack, wait_for_status

PROBLEM = "urn:mmaudio:problem:"
MAX_UPLOAD = int(MAIN_SETTINGS["MMAUDIO_MAX_UPLOAD_BYTES"])


def assert_problem(response: httpx.Response, status: int, slug: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["type"] == PROBLEM + slug, body
    assert body["status"] == status and body["title"]
    return body


def queued_total(stack: Stack) -> float:
    """Jobs that were ever queued, from /metrics."""
    text = httpx.get(f"{stack.url}/metrics").text
    return float(re.search(r'^mmaudio_jobs_total\{status="queued"\} (\S+)$', text, re.M)[1])


def upload(client: httpx.Client, path: Path, field: str = "video", **fields: str) -> httpx.Response:
    with path.open("rb") as handle:
        return client.post("/v1/jobs", data=fields, files={field: (path.name, handle)})


@pytest.mark.parametrize(
    ("name", "field", "status", "slug"),
    [
        ("text", "video", 415, "unreadable-media"),
        ("audio_only", "video", 415, "no-video-stream"),
        ("unknown_codec", "video", 415, "unsupported-codec"),
        ("truncated", "video", 422, "truncated-media"),
        ("empty", "video", 422, "empty-upload"),
        ("too_long", "video", 422, "media-limits"),
        ("too_wide", "video", 422, "media-limits"),
        ("too_short", "video", 422, "video-too-short"),
        ("text", "image", 415, "unreadable-media"),
        ("empty", "image", 422, "empty-upload"),
    ],
)
def test_broken_uploads_are_refused_before_the_queue(
    stack: Stack, alice: httpx.Client, media: Media, name: str, field: str, status: int, slug: str
) -> None:
    before = queued_total(stack)
    body = assert_problem(upload(alice, getattr(media, name), field, prompt="x"), status, slug)
    assert body["detail"] and body["instance"] == "/v1/jobs"
    assert queued_total(stack) == before
    assert stack.ready_workers() >= 1


def test_oversized_upload_is_refused_while_streaming(alice: httpx.Client) -> None:
    boundary = "mmaudio-test-boundary"
    sent = 0

    def body() -> Iterator[bytes]:
        nonlocal sent
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="video"; filename="big.mp4"\r\n'
            "Content-Type: video/mp4\r\n\r\n"
        ).encode()
        chunk = b"\0" * 65536
        for _ in range(2 * MAX_UPLOAD // len(chunk)):  # no Content-Length: only counting can stop it
            sent += len(chunk)
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    try:
        response = alice.post("/v1/jobs", content=body(), headers=headers)
    except httpx.TransportError:
        pytest.fail("the server closed the connection instead of answering 413")
    body_json = assert_problem(response, 413, "upload-too-large")
    assert body_json["limit_bytes"] == MAX_UPLOAD


def test_absurd_content_length_is_refused_before_reading(stack: Stack) -> None:
    port = int(stack.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/jobs HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary=x\r\n"
            b"Authorization: Bearer key-alice-0123456789\r\nContent-Length: 1000000000000\r\n\r\n--x\r\n"
        )
        answer = b""
        while b"upload-too-large" not in answer and (chunk := sock.recv(65536)):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert b"urn:mmaudio:problem:upload-too-large" in answer


def test_file_just_under_the_limit_is_not_refused_for_size(alice: httpx.Client, tmp_path: Path) -> None:
    filler = tmp_path / "filler.mp4"
    filler.write_bytes(b"\0" * (MAX_UPLOAD - 1024))
    assert_problem(upload(alice, filler), 415, "unreadable-media")


@pytest.mark.parametrize(
    ("body", "slug"),
    [
        ({"duration": 0.2}, "validation-error"),
        ({"duration": 11}, "validation-error"),
        ({"num_steps": 0}, "validation-error"),
        ({"num_steps": 201}, "validation-error"),
        ({"cfg_strength": -1}, "validation-error"),
        ({"num_samples": 5}, "validation-error"),
        ({"seed": -3}, "validation-error"),
        ({"prompt": "x" * 1001}, "validation-error"),
        ({"surprise": 1}, "validation-error"),
        ({"output_format": "mp4"}, "validation-error"),
        ({"output_format": "ogg"}, "validation-error"),
        ({"variant": "nope"}, "validation-error"),
        ({"variant": "medium_44k"}, "variant-unavailable"),
        ({"webhook_url": "ftp://example.com/hook"}, "validation-error"),
    ],
)
def test_invalid_parameters(alice: httpx.Client, body: dict, slug: str) -> None:
    problem = assert_problem(alice.post("/v1/jobs", json=body), 422, slug)
    if slug == "validation-error":
        assert problem["errors"] or problem["detail"]


def test_malformed_bodies(alice: httpx.Client, media: Media) -> None:
    assert_problem(alice.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"}), 422,
                   "validation-error")  # fmt: skip
    assert_problem(alice.post("/v1/jobs", json=[1, 2]), 422, "validation-error")
    assert_problem(alice.post("/v1/jobs", content=b"prompt=x", headers={"Content-Type": "text/plain"}), 415,
                   "unsupported-media-type")  # fmt: skip
    with media.video.open("rb") as video, media.image.open("rb") as image:
        both = alice.post("/v1/jobs", files={"video": ("a.mp4", video), "image": ("b.png", image)})
    assert_problem(both, 422, "validation-error")
    with media.video.open("rb") as video:
        other = alice.post("/v1/jobs", files={"audio": ("a.mp4", video)})
    assert_problem(other, 422, "validation-error")
    cut = alice.post(
        "/v1/jobs",
        content=b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nhi',
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )
    assert_problem(cut, 422, "validation-error")


def test_unknown_job_and_route(alice: httpx.Client) -> None:
    assert_problem(alice.get("/v1/jobs/does-not-exist"), 404, "not-found")
    assert_problem(alice.get("/v1/nothing-here"), 404, "not-found")
    assert_problem(alice.put("/v1/jobs/does-not-exist"), 405, "method-not-allowed")
    assert_problem(alice.delete("/v1/jobs/does-not-exist"), 404, "not-found")
    assert_problem(alice.get("/v1/jobs/x/result", params={"sample": -1}), 422, "validation-error")


def test_full_queue_answers_429_with_retry_after(alice: httpx.Client) -> None:
    # small_16k is served here but no worker runs it: its jobs stay queued
    limit = int(MAIN_SETTINGS["MMAUDIO_MAX_QUEUE"])
    queued = []
    try:
        for _ in range(limit):
            response = alice.post("/v1/jobs", json={"variant": "small_16k", "duration": 1.5, "num_steps": 2})
            assert response.status_code == 202, response.text
            queued.append(response.json())
        assert [alice.get(f"/v1/jobs/{job['id']}").json()["queue_position"] for job in queued] == [1, 2, 3, 4]
        refused = alice.post("/v1/jobs", json={"variant": "small_16k", "duration": 1.5, "num_steps": 2})
        problem = assert_problem(refused, 429, "queue-full")
        assert int(refused.headers["retry-after"]) >= 1
        assert problem["retry_after_seconds"] == int(refused.headers["retry-after"])
    finally:
        for job in queued:
            alice.post(f"/v1/jobs/{job['id']}/cancel")
    for job in queued:
        assert wait_for_status(alice, job["id"], {"canceled"}, timeout=5)["attempts"] == 0
