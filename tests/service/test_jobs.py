"""End to end through the real API, queue and worker: submit, follow, download, cancel, replay, webhooks."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import av
import httpx
import pytest
from redis import Redis
from service_harness import (
    CLIENT_TIMEOUT,
    QUICK,
    SLOW,
    WAIT,
    WEBHOOK_SECRET,
    Media,
    Stack,
    WebhookReceiver,
    form,
    wait_for_sampling,
    wait_for_status,
    wait_until,
)

from service import keys


def submit_video(client: httpx.Client, path: Path, headers: dict | None = None, **fields: str) -> httpx.Response:
    with path.open("rb") as handle:
        files = {"video": (path.name, handle, "video/mp4")}
        return client.post("/v1/jobs", data=fields, files=files, headers=headers or {})


def parsed_events(response: httpx.Response) -> Iterator[tuple[str, int, dict]]:
    """(event, id, job) of each server-sent event as it arrives."""
    name, event_id = "", 0
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("id: "):
            event_id = int(line.removeprefix("id: "))
        elif line.startswith("data: "):
            yield name, event_id, json.loads(line.removeprefix("data: "))


def follow_events(client: httpx.Client, url: str, last_event_id: int | None = None) -> Iterator[tuple[str, int, dict]]:
    """A job's event stream, resumed after ``last_event_id`` when given; closed when the caller stops."""
    headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
    with client.stream("GET", url, headers=headers, timeout=CLIENT_TIMEOUT) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        yield from parsed_events(response)


def read_sse(client: httpx.Client, url: str, last_event_id: int | None = None) -> list[tuple[str, int, dict]]:
    """Every (event, id, job) of a job's event stream, until the server ends it."""
    return list(follow_events(client, url, last_event_id))


def video_packets(data: bytes | Path) -> list[tuple[bytes, float, float, bool]]:
    """(payload, pts s, dts s, keyframe) of every packet of the first video stream."""
    source = io.BytesIO(data) if isinstance(data, bytes) else str(data)
    with av.open(source) as container:
        stream = container.streams.video[0]
        return [
            (bytes(p), float(p.pts * p.time_base), float(p.dts * p.time_base), p.is_keyframe)
            for p in container.demux(stream)
            if p.size
        ]


def audio_seconds(data: bytes) -> tuple[str, float, int]:
    """(codec, decoded seconds, sample rate) of the first audio stream."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        return stream.codec_context.name, samples / stream.rate, stream.rate


def test_video_job_end_to_end(stack: Stack, alice: httpx.Client, media: Media) -> None:
    started = time.monotonic()
    response = submit_video(alice, media.video, prompt="a dog barks", duration="8", num_steps="2", seed="7")
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == job["links"]["self"]
    assert job["status"] in ("queued", "running")
    assert job["params"]["seed"] == 7 and job["params"]["output_format"] == "mp4"
    assert job["input"]["kind"] == "video" and job["input"]["media"]["width"] == 320
    assert job["model"]["weights"]["kind"] == "tiny" and job["model"]["weights"]["random_weights"] is True

    events = read_sse(alice, job["links"]["events"])
    statuses = [data["status"] for name, _, data in events if name == "status"]
    assert statuses[-1] == "succeeded", events[-1]
    assert "running" in statuses
    fractions = [d["progress"]["fraction"] for _, _, d in events if (d["progress"] or {}).get("stage") == "sampling"]
    assert fractions and fractions == sorted(fractions)
    ids = [event_id for _, event_id, _ in events]
    assert ids == sorted(set(ids)), ids  # the job's revisions: increasing, across connections too
    done = events[-1][2]
    elapsed = time.monotonic() - started

    # the 1.6 s video shortens the 8 s request; the result says so
    assert done["result"]["duration"] == pytest.approx(1.6, abs=0.05)
    assert done["model"]["weights"]["id"] == "tiny-large_44k_v2-seed0"
    assert done["model"]["weights"]["random_weights"] is True and "random weights" in done["model"]["weights"]["note"]
    assert done["attempts"] == 1 and done["worker"]
    assert set(done["timings"]) >= {"queue", "input", "model", "encode", "total"}
    assert done["timings"]["total"] <= elapsed + 0.5

    download = alice.get(done["links"]["result"])
    assert download.status_code == 200
    assert download.headers["content-type"] == "video/mp4"
    assert download.headers["content-disposition"].startswith('attachment; filename="clip-0.mp4"')
    assert int(download.headers["content-length"]) == len(download.content)

    # the uploaded video packets, unchanged: the decode-order prefix that shows every frame before the end
    original = video_packets(media.video)
    muxed = video_packets(download.content)
    assert [p[0] for p in muxed] == [p[0] for p in original[: len(muxed)]]
    assert [p[1] for p in muxed] == pytest.approx([p[1] for p in original[: len(muxed)]], abs=1e-3)
    shown = {round(p[1], 3) for p in muxed}
    assert all(round(p[1], 3) in shown for p in original if p[1] < done["result"]["duration"])
    codec, seconds, rate = audio_seconds(download.content)
    assert codec == "aac" and rate == 44100
    assert seconds == pytest.approx(done["result"]["duration"], abs=0.05)

    # the upload is gone once the job has ended; the results stay
    redis = Redis.from_url(stack.env["MMAUDIO_REDIS_URL"])
    assert not redis.exists(keys.blob(f"uploads/{job['id']}"))
    assert redis.ttl(keys.blob(f"results/{job['id']}/0.mp4")) > 3000

    model_seconds = done["timings"]["model"]["total"]
    print(
        f"\nvideo job: submit to done {elapsed:.2f} s, model {model_seconds:.2f} s, "
        f"service overhead {elapsed - model_seconds:.2f} s, timings {done['timings']}"
    )


def test_result_ranges_and_head(alice: httpx.Client, media: Media) -> None:
    job = submit_video(alice, media.video, **form(QUICK)).json()
    job = wait_for_status(alice, job["id"], {"succeeded"})
    url = job["links"]["result"]
    whole = alice.get(url).content

    head = alice.head(url)
    assert head.status_code == 200 and int(head.headers["content-length"]) == len(whole)
    assert head.headers["accept-ranges"] == "bytes"

    part = alice.get(url, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206
    assert part.headers["content-range"] == f"bytes 100-199/{len(whole)}"
    assert part.content == whole[100:200]
    tail = alice.get(url, headers={"Range": "bytes=-50"})
    assert tail.status_code == 206 and tail.content == whole[-50:]
    open_ended = alice.get(url, headers={"Range": f"bytes={len(whole) - 10}-"})
    assert open_ended.content == whole[-10:]

    beyond = alice.get(url, headers={"Range": f"bytes={len(whole)}-"})
    assert beyond.status_code == 416
    assert beyond.headers["content-range"] == f"bytes */{len(whole)}"
    assert beyond.headers["content-type"] == "application/problem+json"


def test_text_job_gives_flac_and_other_audio_formats(alice: httpx.Client) -> None:
    response = alice.post("/v1/jobs", json={"prompt": "rain on a tin roof", "duration": 1.5, "num_steps": 1})
    assert response.status_code == 202, response.text
    job = wait_for_status(alice, response.json()["id"], {"succeeded", "failed"})
    assert job["status"] == "succeeded", job["error"]
    assert job["params"]["output_format"] == "flac" and job["input"]["kind"] == "text"
    assert job["result"]["formats"] == ["flac", "wav", "m4a"]

    flac = alice.get(job["links"]["result"])
    assert flac.headers["content-type"] == "audio/flac"
    assert audio_seconds(flac.content)[:2] == ("flac", pytest.approx(1.5, abs=0.01))
    wav = alice.get(f"{job['links']['self']}/result", params={"format": "wav"})
    assert wav.status_code == 200 and wav.headers["content-type"] == "audio/wav"
    assert audio_seconds(wav.content)[1] == pytest.approx(1.5, abs=0.01)
    m4a = alice.get(f"{job['links']['self']}/result", params={"format": "m4a"})
    assert m4a.headers["content-type"] == "audio/mp4"
    codec, seconds, _ = audio_seconds(m4a.content)
    assert codec == "aac" and seconds == pytest.approx(1.5, abs=0.05)

    no_video = alice.get(f"{job['links']['self']}/result", params={"format": "mp4"})
    assert no_video.status_code == 404
    assert no_video.json()["type"] == "urn:mmaudio:problem:result-unavailable"
    no_sample = alice.get(f"{job['links']['self']}/result", params={"sample": 1})
    assert no_sample.status_code == 404


def test_image_job_with_two_samples(alice: httpx.Client, media: Media) -> None:
    with media.image.open("rb") as handle:
        response = alice.post(
            "/v1/jobs",
            data={"prompt": "birds", "num_samples": "2", "seed": "100", **form(QUICK)},
            files={"image": ("still.png", handle, "image/png")},
        )
    assert response.status_code == 202, response.text
    job = wait_for_status(alice, response.json()["id"], {"succeeded", "failed"})
    assert job["status"] == "succeeded", job["error"]
    assert job["result"]["num_samples"] == 2 and job["params"]["seed"] == 100
    first = alice.get(f"{job['links']['self']}/result", params={"sample": 0}).content
    second = alice.get(f"{job['links']['self']}/result", params={"sample": 1}).content
    assert audio_seconds(first)[1] == pytest.approx(1.0, abs=0.01) and first != second


def test_prefer_wait_answers_with_the_finished_job(alice: httpx.Client) -> None:
    response = alice.post("/v1/jobs", json=QUICK, headers=WAIT)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "succeeded"
    assert response.headers["preference-applied"] == "wait=60"
    assert response.headers["location"].endswith(response.json()["id"])


def test_prefer_wait_gives_up_after_n_seconds(alice: httpx.Client) -> None:
    started = time.monotonic()
    response = alice.post("/v1/jobs", json=SLOW, headers={"Prefer": "wait=1"})
    assert response.status_code == 202
    assert 1.0 <= time.monotonic() - started < 10
    assert alice.post(f"/v1/jobs/{response.json()['id']}/cancel").status_code in (200, 202)
    wait_for_status(alice, response.json()["id"], {"canceled"})


def first_sse_event(client: httpx.Client, url: str, last_event_id: int) -> tuple[str, int, dict]:
    """The first event of a stream resumed after ``last_event_id``; the connection is dropped after it."""
    stream = follow_events(client, url, last_event_id)
    try:
        return next(stream)
    finally:
        stream.close()


def test_event_stream_resumes_after_last_event_id(alice: httpx.Client) -> None:
    job = alice.post("/v1/jobs", json=SLOW).json()
    events = job["links"]["events"]
    wait_for_sampling(alice, job["id"])
    _, seen, state = first_sse_event(alice, events, 0)
    assert state["progress"]["stage"] == "sampling"
    _, later, _ = first_sse_event(alice, events, seen)  # the next step's progress, not the state already seen
    assert later > seen

    assert alice.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
    final = wait_for_status(alice, job["id"], {"canceled"}, timeout=60)
    replay = read_sse(alice, events, last_event_id=later)
    assert replay[-1][0] == "status" and replay[-1][2]["status"] == "canceled"
    last = replay[-1][1]
    assert all(event_id > later for _, event_id, _ in replay)
    # seen the end: 204 tells an EventSource to stop reconnecting; a garbled id counts as none
    assert alice.get(events, headers={"Last-Event-ID": str(last)}).status_code == 204
    assert read_sse(alice, events, last_event_id=last - 1) == [("status", last, replay[-1][2])]
    fresh = alice.get(events, headers={"Last-Event-ID": "not-a-number"})
    assert fresh.status_code == 200 and f"id: {last}" in fresh.text
    assert replay[-1][2]["finished_at"] == final["finished_at"]


def test_idempotent_resubmit(alice: httpx.Client, bob: httpx.Client, media: Media) -> None:
    key = {"Idempotency-Key": f"upload-{time.time_ns()}"}
    first = submit_video(alice, media.video, headers=key, prompt="waves", **form(QUICK))
    again = submit_video(alice, media.video, headers=key, prompt="waves", **form(QUICK))
    assert first.status_code == 202 and again.status_code in (200, 202)
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"

    other_params = submit_video(alice, media.video, headers=key, prompt="wind", **form(QUICK))
    assert other_params.status_code == 422
    assert other_params.json()["type"] == "urn:mmaudio:problem:idempotency-key-reused"
    other_file = submit_video(alice, media.image, headers=key, prompt="waves", **form(QUICK))
    assert other_file.status_code in (415, 422)

    # keys are scoped per API key: bob's identical request makes his own job
    bobs = submit_video(bob, media.video, headers=key, prompt="waves", **form(QUICK))
    assert bobs.status_code == 202 and bobs.json()["id"] != first.json()["id"]
    for client, job in ((alice, first.json()), (bob, bobs.json())):
        wait_for_status(client, job["id"], {"succeeded"})
    assert alice.post("/v1/jobs", json=QUICK, headers=key).status_code == 422


def test_cancel_queued_and_running(alice: httpx.Client) -> None:
    running = alice.post("/v1/jobs", json=SLOW).json()
    wait_for_sampling(alice, running["id"])
    queued = alice.post("/v1/jobs", json=QUICK).json()
    assert alice.get(f"/v1/jobs/{queued['id']}").json()["queue_position"] == 1

    canceled = alice.post(f"/v1/jobs/{queued['id']}/cancel")
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"

    asked = alice.post(f"/v1/jobs/{running['id']}/cancel")
    assert asked.status_code == 202 and asked.json()["cancel_requested"] is True
    stopped = wait_for_status(alice, running["id"], {"canceled", "succeeded", "failed"}, timeout=60)
    assert stopped["status"] == "canceled"
    assert stopped["result"] is None and stopped["finished_at"]

    # the canceled queued job never ran; canceling again is harmless; an ended job cannot be canceled
    assert alice.get(f"/v1/jobs/{queued['id']}").json()["attempts"] == 0
    assert alice.post(f"/v1/jobs/{queued['id']}/cancel").status_code == 200
    done = alice.post("/v1/jobs", json=QUICK, headers=WAIT).json()
    refused = alice.post(f"/v1/jobs/{done['id']}/cancel")
    assert refused.status_code == 409 and refused.json()["type"] == "urn:mmaudio:problem:job-not-cancelable"


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    server = WebhookReceiver(failures=1)
    yield server
    server.close()


def test_webhook_is_signed_and_retried(alice: httpx.Client, receiver: WebhookReceiver) -> None:
    job = alice.post("/v1/jobs", json=QUICK | {"webhook_url": receiver.url}).json()
    assert job["webhook"]["status"] == "pending"
    wait_until(lambda: len(receiver.requests) >= 2, 60, "a failed and a retried webhook delivery")

    (first_headers, _), (headers, body) = receiver.requests[:2]
    assert headers["webhook-id"] == first_headers["webhook-id"] == f"msg_{job['id']}"
    assert headers["host"] == receiver.url.split("/")[2]  # sent to the checked address, named as in the URL
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
    key = base64.b64decode(WEBHOOK_SECRET.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    assert f"v1,{expected}" in headers["webhook-signature"].split(" ")

    payload = json.loads(body)
    assert payload["type"] == "job.succeeded"
    assert payload["data"]["id"] == job["id"] and payload["data"]["status"] == "succeeded"
    assert payload["data"]["result"]["files"]
    delivered = wait_until(
        lambda: (j := alice.get(f"/v1/jobs/{job['id']}").json())["webhook"]["status"] == "delivered" and j,
        30,
        "the delivery to be recorded",
    )
    assert delivered["webhook"]["attempts"] == 2


def test_api_keys_isolate_jobs(stack: Stack, alice: httpx.Client, bob: httpx.Client) -> None:
    job = alice.post("/v1/jobs", json=QUICK).json()
    for path in ("", "/events", "/result"):
        seen = bob.get(f"/v1/jobs/{job['id']}{path}")
        assert seen.status_code == 404, path
        assert seen.json()["type"] == "urn:mmaudio:problem:not-found"
    assert bob.post(f"/v1/jobs/{job['id']}/cancel").status_code == 404
    assert alice.get(f"/v1/jobs/{job['id']}").status_code == 200

    anonymous = httpx.post(f"{stack.url}/v1/jobs", json=QUICK)
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"].startswith("Bearer")
    wrong = httpx.get(f"{stack.url}/v1/jobs/{job['id']}", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert wrong.json()["type"] == "urn:mmaudio:problem:unauthorized"
    wait_for_status(alice, job["id"], {"succeeded"})


def all_pages(client: httpx.Client, url: str) -> tuple[list[dict], int]:
    """Every job of a listing, following its `next` links; and the number of pages."""
    jobs, pages = [], 0
    while url:
        response = client.get(url)
        assert response.status_code == 200, response.text
        jobs += response.json()["jobs"]
        url, pages = response.json()["next"], pages + 1
    return jobs, pages


def test_job_listing_pages_filters_and_isolates(stack: Stack, alice: httpx.Client, bob: httpx.Client) -> None:
    mine = [bob.post("/v1/jobs", json=QUICK | {"prompt": f"take {i}"}, headers=WAIT).json() for i in range(4)]
    canceled = bob.post("/v1/jobs", json=SLOW).json()
    assert bob.post(f"/v1/jobs/{canceled['id']}/cancel").status_code in (200, 202)
    wait_for_status(bob, canceled["id"], {"canceled"})
    alices = alice.post("/v1/jobs", json=QUICK, headers=WAIT).json()

    listed, pages = all_pages(bob, "/v1/jobs?limit=2")
    ids = [job["id"] for job in listed]
    assert ids[:5] == [canceled["id"], *(job["id"] for job in reversed(mine))]  # newest first
    assert len(ids) == len(set(ids)) and pages == (len(ids) + 1) // 2
    assert alices["id"] not in ids and all(job["links"]["self"].endswith(job["id"]) for job in listed)
    created = [job["created_at"] for job in listed]
    assert created == sorted(created, reverse=True)

    only, _ = all_pages(bob, "/v1/jobs?status=canceled&limit=1")
    assert canceled["id"] in {job["id"] for job in only} and {job["status"] for job in only} == {"canceled"}
    both, _ = all_pages(bob, "/v1/jobs?status=canceled&status=succeeded")
    assert {job["id"] for job in both} == set(ids)

    # an expired job drops out of the listing (and its index)
    redis = Redis.from_url(stack.env["MMAUDIO_REDIS_URL"])
    index = keys.owner_jobs(redis.hget(keys.job(mine[0]["id"]), "owner").decode())
    assert redis.zscore(index, mine[0]["id"]) is not None
    redis.delete(keys.job(mine[0]["id"]))
    assert mine[0]["id"] not in {job["id"] for job in all_pages(bob, "/v1/jobs")[0]}
    assert redis.zscore(index, mine[0]["id"]) is None

    for bad in ("status=done", "limit=0", "before=yesterday"):
        response = bob.get(f"/v1/jobs?{bad}")
        assert response.status_code == 422, bad
        assert response.json()["type"] == "urn:mmaudio:problem:validation-error"


def test_result_before_the_end_is_a_conflict(alice: httpx.Client) -> None:
    job = alice.post("/v1/jobs", json=SLOW).json()
    early = alice.get(f"/v1/jobs/{job['id']}/result")
    assert early.status_code == 409 and early.json()["type"] == "urn:mmaudio:problem:job-not-finished"
    alice.post(f"/v1/jobs/{job['id']}/cancel")
    wait_for_status(alice, job["id"], {"canceled"})
    gone = alice.get(f"/v1/jobs/{job['id']}/result")
    assert gone.status_code == 404 and gone.json()["type"] == "urn:mmaudio:problem:result-unavailable"


def test_service_overhead_per_job(alice: httpx.Client) -> None:
    """Submit-to-done time minus the pipeline's own time, for short text jobs answered via Prefer: wait."""
    overheads, server_side = [], []
    for _ in range(5):
        started = time.monotonic()
        job = alice.post("/v1/jobs", json=QUICK, headers=WAIT).json()
        elapsed = time.monotonic() - started
        assert job["status"] == "succeeded"
        model = job["timings"]["model"]["total"]
        overheads.append(elapsed - model)
        server_side.append(job["timings"]["total"] - model)
    overheads.sort()
    print(
        f"\nservice overhead per text job (1 s, 1 step): median {overheads[2] * 1000:.0f} ms, "
        f"min {overheads[0] * 1000:.0f} ms, max {overheads[-1] * 1000:.0f} ms; "
        f"server side (created to finished minus model) median {sorted(server_side)[2] * 1000:.0f} ms"
    )
    assert overheads[2] < 3.0
