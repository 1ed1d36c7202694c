"""Waiting for job changes without polling: each change is announced on the job's Redis channel."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from starlette.concurrency import run_in_threadpool

from service import keys
from service.api.state import AppState
from service.jobs import JobRecord
from service.views import job_view

KEEPALIVE_SECONDS = 15.0
RECONNECT_MILLISECONDS = 2000  # how long a client waits before it reconnects a dropped stream


async def job_updates(
    state: AppState, job_id: str, timeout: float | None = None, keepalive: float = KEEPALIVE_SECONDS
) -> AsyncIterator[JobRecord | None]:
    """The job now, then again after every change, until it ends, vanishes or ``timeout`` passes.

    Yields None after every ``keepalive`` seconds without a change (so a stream can send a keep-alive).
    Subscribing happens before the first read, so no change between the two is missed.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    async with state.events.pubsub() as pubsub:
        await _subscribe(pubsub, keys.job_events(job_id))
        while True:
            record = await run_in_threadpool(state.jobs.get, job_id)
            if record is None:
                return
            yield record
            if record.status.terminal:
                return
            changed = False
            while not changed:
                wait = keepalive if deadline is None else min(keepalive, deadline - time.monotonic())
                if wait <= 0:
                    return
                changed = await _next_change(pubsub, wait)
                if not changed:
                    yield None


async def _subscribe(pubsub, channel: str) -> None:
    await pubsub.subscribe(channel)
    while True:  # the confirmation proves the server registered us
        message = await pubsub.get_message(timeout=5.0)
        if message is not None and message["type"] == "subscribe":
            return


async def _next_change(pubsub, wait: float) -> bool:
    """Waits up to ``wait`` seconds for an announcement; then swallows any that queued up behind it."""
    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=wait)
    if message is None:
        return False
    while await pubsub.get_message(ignore_subscribe_messages=True, timeout=0) is not None:
        pass
    return True


async def wait_until_finished(state: AppState, job_id: str, timeout: float) -> JobRecord | None:
    """The job once it has ended, or as it is when ``timeout`` passes."""
    last = None
    async for record in job_updates(state, job_id, timeout=timeout):
        if record is not None:
            last = record
    return last


def sse_event(event: str, data: dict, event_id: int) -> bytes:
    return f"event: {event}\nid: {event_id}\ndata: {json.dumps(data)}\n\n".encode()


def last_event_id(header: str | None) -> int:
    """The revision a reconnecting client has seen (its `Last-Event-ID`); 0 when absent or not ours."""
    return int(header) if header and header.isdigit() else 0


async def sse_stream(state: AppState, job_id: str, base_url: str, seen: int = 0) -> AsyncIterator[bytes]:
    """Server-sent events: ``status`` when the status changes, ``progress`` for anything else, each with the
    whole job object and the job's revision as its id; ends after the final status. A client that has seen
    revision ``seen`` gets only later ones (each event carries the whole state, so nothing is lost)."""
    previous_status = None
    previous_view = None
    yield f"retry: {RECONNECT_MILLISECONDS}\n\n".encode()
    async for record in job_updates(state, job_id):
        if record is None:
            yield b": keep-alive\n\n"
            continue
        if record.revision <= seen:
            continue
        place = await run_in_threadpool(state.jobs.queue_place, record)
        view = job_view(record, base_url, place)
        if view == previous_view:
            continue
        yield sse_event("status" if record.status != previous_status else "progress", view, record.revision)
        previous_status, previous_view = record.status, view
