"""One request's data or a dead dependency can never stop other work: bad text is refused at the boundary, a
stored record that a worker cannot read fails alone while the same worker goes on, and while Redis is
unreachable every route that needs it answers 503 with Retry-After."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx
from redis import Redis
from service_harness import (
    CLIENT_TIMEOUT,
    MAIN_SETTINGS,
    QUICK,
    WAIT,
    Media,
    Stack,
    free_port,
    make_stack,
    start_redis,
    wait_for_status,
)
from test_errors import assert_problem, queued_total

from service import keys, queue
from service.api.submission import estimate_wait_seconds
from service.settings import Settings


def stack_redis(stack: Stack) -> Redis:
    return Redis.from_url(stack.env["MMAUDIO_REDIS_URL"])


def test_lone_surrogates_are_refused_before_anything_is_stored(stack: Stack, alice: httpx.Client) -> None:
    before = queued_total(stack)
    for body in (
        b'{"prompt": "x\\ud800y"}',
        b'{"negative_prompt": "\\udfff"}',
        b'{"prompt": "ok", "\\ud83d": 1}',  # in a key too
    ):
        problem = assert_problem(
            alice.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"}), 422, "validation-error"
        )
        assert "surrogate" in problem["detail"]
    # a well-formed pair is one scalar value and is fine
    paired = alice.post(
        "/v1/jobs",
        content=b'{"prompt": "\\ud83d\\udc36 barking", "duration": 1.0, "num_steps": 1}',
        headers={"Content-Type": "application/json"},
    )
    assert paired.status_code == 202, paired.text
    assert paired.json()["params"]["prompt"] == "\N{DOG FACE} barking"
    assert queued_total(stack) == before + 1
    assert alice.get("/v1/jobs").status_code == 200


def test_deep_nesting_and_odd_cursors_are_4xx(alice: httpx.Client) -> None:
    deep = b'{"prompt": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    problem = assert_problem(
        alice.post("/v1/jobs", content=deep, headers={"Content-Type": "application/json"}), 422, "validation-error"
    )
    assert "nested" in problem["detail"]
    for cursor in ("nan", "inf", "-inf", "soon"):
        assert_problem(alice.get("/v1/jobs", params={"before": cursor}), 422, "validation-error")


def test_unreadable_record_fails_alone_and_the_worker_goes_on(stack: Stack, alice: httpx.Client) -> None:
    redis = stack_redis(stack)
    worker = stack.workers[0]
    # A job of the variant no worker serves stays queued; corrupt its stored parameters in ways no claim
    # script can read, then move its queue entry to the served variant's queue.
    poisoned = []
    for params in ('{"prompt": "x\\ud800y", "duration": 1.0}', "{cut", '{"duration": "long", "num_steps": 1}'):
        job = alice.post("/v1/jobs", json={**QUICK, "variant": "small_16k"}).json()
        redis.hset(keys.job(job["id"]), "params", params)
        entry = redis.lpop(queue.list_key("small_16k"))
        assert entry.decode().startswith(job["id"])
        redis.rpush(queue.list_key("large_44k_v2"), entry)
        poisoned.append(job["id"])
    good = alice.post("/v1/jobs", json=QUICK, headers=WAIT).json()
    assert wait_for_status(alice, good["id"], {"succeeded", "failed"})["status"] == "succeeded"
    for job_id in poisoned:
        record = redis.hgetall(keys.job(job_id))
        assert record[b"status"] == b"failed", record
        assert json.loads(record[b"error"])["type"] == "urn:mmaudio:problem:unreadable-job"
        assert redis.ttl(keys.job(job_id)) > 0
    assert redis.llen(queue.list_key("large_44k_v2")) == 0
    listed = alice.get("/v1/jobs", params={"limit": 100})  # the owner's listing skips what does not parse
    assert listed.status_code == 200 and not {j["id"] for j in listed.json()["jobs"]} & set(poisoned)
    assert worker.popen.poll() is None, worker.tail()  # the same process, never restarted
    assert stack.ready_workers() >= 1


def test_redis_down_answers_503_with_retry_after(tmp_path: Path, media: Media) -> None:
    nothing_there = f"redis://127.0.0.1:{free_port()}"  # no redis-server listens: every connection is refused
    settings = {**MAIN_SETTINGS, "MMAUDIO_API_KEYS": "", "MMAUDIO_UNAVAILABLE_RETRY_SECONDS": "7"}
    with make_stack(nothing_there, tmp_path, "no-redis", 0, settings).running() as stack, httpx.Client(
        base_url=stack.url, timeout=CLIENT_TIMEOUT
    ) as client:
        with media.video.open("rb") as video:
            uploaded = client.post("/v1/jobs", files={"video": ("clip.mp4", video)}, data={"prompt": "x"})
        answers = [
            client.post("/v1/jobs", json=QUICK),
            uploaded,
            client.get("/v1/jobs"),
            client.get("/v1/jobs/some-id"),
            client.post("/v1/jobs/some-id/cancel"),
            client.get("/v1/jobs/some-id/result"),
            client.get("/metrics"),
            client.get("/readyz"),
        ]
        for response in answers:
            assert_problem(response, 503, "service-unavailable")
        assert {response.headers.get("retry-after") for response in answers[:-1]} == {"7"}
        assert client.get("/healthz").status_code == 200  # the process itself is fine


def test_worker_waits_out_a_redis_outage(tmp_path: Path) -> None:
    port = free_port()
    redis_process = start_redis(port, tmp_path)
    settings = {**MAIN_SETTINGS, "MMAUDIO_API_KEYS": "", "MMAUDIO_REDIS_RECONNECT_MAX_SECONDS": "0.5"}
    try:
        with make_stack(f"redis://127.0.0.1:{port}", tmp_path, "outage", 0, settings).running(1) as stack, (
            httpx.Client(base_url=stack.url, timeout=CLIENT_TIMEOUT)
        ) as client:
            worker = stack.workers[0]
            redis_process.kill()
            redis_process.wait(10)
            time.sleep(3)  # several failed claims and heartbeats
            assert worker.popen.poll() is None, worker.tail()
            assert_problem(client.post("/v1/jobs", json=QUICK), 503, "service-unavailable")
            down = time.monotonic()
            redis_process = start_redis(port, tmp_path)  # a new, empty Redis on the same address
            stack.wait_for_workers(1)
            print(f"worker ready again {time.monotonic() - down:.2f} s after Redis came back")
            job = client.post("/v1/jobs", json=QUICK, headers=WAIT).json()
            assert wait_for_status(client, job["id"], {"succeeded", "failed"})["status"] == "succeeded"
            assert worker.popen.poll() is None and "Redis reachable again" in worker.tail(200)
    finally:
        redis_process.kill()
        redis_process.wait(10)


def test_retry_after_follows_the_measured_drain_rate(redis_server: str) -> None:
    redis = Redis.from_url(f"{redis_server}/6")
    redis.flushdb()
    settings = Settings(_env_file=None, max_queue=4, drain_window_seconds=60)
    variant = "small_16k"
    for index in range(6):  # two over the limit
        queue.enqueue(redis, variant, f"job{index}", 1, 60, 3600)
    fallback = estimate_wait_seconds(redis, settings, variant)  # nothing measured: depth x assumed job time
    now = time.time()
    # 20 claims over the last 10 s: 2 jobs/s; 3 jobs must leave before there is room -> 1.5 s -> 2
    redis.zadd(keys.claims(variant), {f"old{i}": now - 10 + i * 0.5 for i in range(20)})
    redis.zadd(keys.claims(variant), {"long-ago": now - 3600})  # outside the window: not counted
    assert estimate_wait_seconds(redis, settings, variant) == 2 < fallback
    redis.flushdb()


def exchange(port: int, chunks: list[bytes], pause: float = 0.0, timeout: float = 20.0) -> tuple[bytes, float]:
    """Send ``chunks`` over a raw socket with ``pause`` between them; what came back and when the server closed."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            for index, chunk in enumerate(chunks):
                time.sleep(pause if index else 0.0)
                sock.sendall(chunk)
        except OSError:  # the server closed on us mid-way: read what it said
            pass
        answer = b""
        while block := sock.recv(65536):
            answer += block
    return answer, time.monotonic() - started


def problem_of(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/problem+json" in head.lower(), answer
    return int(head.split()[1]), json.loads(body)


def test_slow_and_malformed_requests_get_problems(tmp_path: Path, redis_server: str) -> None:
    settings = {
        **MAIN_SETTINGS,
        "MMAUDIO_API_KEYS": "",
        "MMAUDIO_HEADER_TIMEOUT_SECONDS": "1.5",
        "MMAUDIO_BODY_IDLE_TIMEOUT_SECONDS": "1.5",
        "MMAUDIO_UPLOAD_TIMEOUT_SECONDS": "4",
    }
    with make_stack(redis_server, tmp_path, "slow", 5, settings).running() as stack:
        port = stack.port
        silent, waited = exchange(port, [])  # connects, sends nothing
        assert problem_of(silent)[0] == 408 and waited < 5
        trickled, waited = exchange(port, [bytes([c]) for c in b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"], 0.2)
        status, problem = problem_of(trickled)
        assert status == 408 and problem["type"] == "urn:mmaudio:problem:request-timeout" and waited < 5
        head = b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        stalled, waited = exchange(port, [head, b'{"prompt": '], 3.0)
        assert waited < 5 and problem_of(stalled)[0] == 408
        dripping = [head.replace(b"100", b"40"), *(b" " for _ in range(40))]  # 1 byte a second: never idle 1.5 s
        dripped, waited = exchange(port, dripping, 1.0)
        assert 3.5 < waited < 8 and problem_of(dripped)[0] == 408
        for malformed in (
            b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
            b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Bad: a\x00b\r\n\r\n",
            b"NOT HTTP AT ALL\r\n\r\n",
        ):
            status, problem = problem_of(exchange(port, [malformed])[0])
            assert status == 400 and problem["type"] == "urn:mmaudio:problem:malformed-request", malformed
        ok = httpx.get(f"{stack.url}/healthz")  # and the server is fine
        assert ok.status_code == 200
