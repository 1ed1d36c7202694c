"""What the API process holds for its lifetime, and the FastAPI dependencies that hand it out."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from service.api.auth import KeyRing
from service.api.submission import Submitter
from service.jobs import JobRecord, JobStore
from service.problems import ProblemError
from service.results import Results
from service.settings import Settings
from service.storage import BlobStore


@dataclass
class AppState:
    settings: Settings
    redis: Redis  # blocking client, used from the thread pool
    events: AsyncRedis  # asyncio client for pub/sub waits (SSE, Prefer: wait)
    store: BlobStore
    jobs: JobStore
    results: Results
    submitter: Submitter
    keyring: KeyRing


def app_state(request: Request) -> AppState:
    return request.app.state.mmaudio


def current_owner(request: Request) -> str:
    """The owner of the request's API key (401 when keys are on and it has none)."""
    return app_state(request).keyring.owner(request.headers.get("authorization"))


def base_url(request: Request) -> str:
    return app_state(request).settings.base_url or str(request.base_url)


def owned_job(state: AppState, job_id: str, owner: str) -> JobRecord:
    """The job if it exists and belongs to ``owner``; any other job is reported as absent."""
    record = state.jobs.get(job_id)
    if record is None or record.owner != owner:
        raise ProblemError("not-found", f"No job {job_id}.")
    return record
