"""A job record as clients see it: the /v1 job object with absolute links."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from service.capacity import QueuePlace
from service.jobs import JobRecord
from service.results import available_formats
from service.schemas import Job, JobStatus


def timestamp(seconds: float | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC)


def job_url(base_url: str, job_id: str) -> str:
    return f"{base_url.rstrip('/')}/v1/jobs/{job_id}"


def result_url(base_url: str, job_id: str, fmt: str, sample: int) -> str:
    return f"{job_url(base_url, job_id)}/result?format={fmt}&sample={sample}"


def job_view(record: JobRecord, base_url: str, place: QueuePlace | None) -> dict[str, Any]:
    """The job object (JSON-ready) of ``record`` (``place``: where it stands if queued); validated against the
    public schema."""
    href = job_url(base_url, record.id)
    result = None
    if record.result is not None:
        formats = available_formats(record.result)
        sizes = record.result.sizes
        files = [
            {
                "sample": sample,
                "format": fmt,
                "size": sizes.get(f"{sample}.{fmt}"),
                "href": result_url(base_url, record.id, fmt, sample),
            }
            for sample in range(record.result.num_samples)
            for fmt in formats
        ]
        result = {
            "duration": record.result.duration,
            "sample_rate": record.result.sample_rate,
            "num_samples": record.result.num_samples,
            "windows": record.result.windows,
            "formats": formats,
            "files": files,
            "expires_at": timestamp(record.finished_at + record.result.ttl_seconds),
        }
    output_format = record.params.output_format
    job = Job(
        id=record.id,
        status=record.status,
        queue_position=place and place.position,
        estimated_start_at=timestamp(place and place.estimated_start_at),
        progress=record.progress,
        cancel_requested=record.cancel_requested,
        created_at=timestamp(record.created_at),
        started_at=timestamp(record.started_at),
        finished_at=timestamp(record.finished_at),
        deadline=timestamp(record.deadline),
        timings=record.timings,
        params=record.params,
        input=record.input,
        model=record.model,
        result=result,
        error=record.error,
        attempts=record.attempts,
        worker=record.worker,
        webhook=record.webhook,
        links={
            "self": href,
            "events": f"{href}/events",
            "cancel": f"{href}/cancel",
            "result": result_url(base_url, record.id, output_format, 0)
            if record.status is JobStatus.succeeded
            else None,
        },
    )
    return job.model_dump(mode="json")
