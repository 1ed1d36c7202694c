"""/v1/jobs: submit, read, follow, cancel, download and delete."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from service.api.events import last_event_id, sse_stream, wait_until_finished
from service.api.ranges import byte_range, content_disposition
from service.api.state import app_state, base_url, current_owner, owned_job
from service.api.submission import cancel_after_seconds
from service.api.uploads import read_submit_body
from service.problems import MEDIA_TYPE as PROBLEM_MEDIA_TYPE
from service.problems import ProblemError
from service.results import MEDIA_TYPES
from service.schemas import JOB_EXAMPLE_ID, Job, JobPage, JobParams, JobStatus, ProblemDetails, ResultFormat
from service.views import job_url, job_view

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

Owner = Annotated[str, Depends(current_owner)]
JobId = Annotated[str, PathParam(description="The job's id.", examples=[JOB_EXAMPLE_ID])]
DEFAULT_PAGE_SIZE = 20
PROBLEM_RESPONSE = {"model": ProblemDetails, "content": {PROBLEM_MEDIA_TYPE: {}}}


def form_value(value: object) -> str:
    """A JSON parameter value as a multipart form field writes it (lists comma-separated)."""
    if isinstance(value, list):
        return ",".join(map(form_value, value))
    return str(value).lower() if isinstance(value, bool) else str(value)


_form_fields = {
    name: {
        "type": "string",
        "description": field.description,
        **({"examples": [form_value(example) for example in field.examples]} if field.examples else {}),
    }
    for name, field in JobParams.model_fields.items()
}
SUBMIT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": JobParams.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "video": {"type": "string", "format": "binary", "description": "A video (video-to-audio)."},
                        "image": {"type": "string", "format": "binary", "description": "A still image."},
                        **_form_fields,
                    },
                }
            },
        },
    }
}


def preferred_wait(prefer: str | None, cap: float) -> float | None:
    """Seconds of ``Prefer: wait=N`` (RFC 7240), capped; None when absent."""
    for token in re.split(r"[,;]", prefer or ""):
        name, _, value = token.strip().partition("=")
        if name.strip().lower() == "wait" and value.strip().isdigit():
            return min(float(value), cap)
    return None


@router.post(
    "",
    status_code=202,
    response_model=Job,
    openapi_extra=SUBMIT_BODY,
    summary="Submit a job",
    responses={
        200: {"model": Job, "description": "The job has already ended (Prefer: wait, or an idempotent replay)."},
        **{code: PROBLEM_RESPONSE for code in (401, 409, 413, 415, 422, 429)},
    },
)
async def submit_job(
    request: Request,
    owner: Owner,
    idempotency_key: Annotated[
        str | None,
        Header(
            max_length=255,
            description="A retried submit with the same key returns the same job.",
            examples=["7d1c2a40-retry-safe"],
        ),
    ] = None,
    prefer: Annotated[
        str | None,
        Header(description="`wait=N`: answer with the finished job if it ends within N seconds.", examples=["wait=10"]),
    ] = None,
    cancel_after: Annotated[
        str | None,
        Header(
            alias="Cancel-After",
            description="Cancel the job if it has not finished this long after the submit: seconds (`90`) or a "
            "duration (`90s`, `2m`, `1h`), capped by the deployment. A queued job past it never starts.",
            examples=["90s"],
        ),
    ] = None,
) -> Response:
    """JSON for text-to-audio, or with a `video_url` / `image_url` the service fetches; multipart/form-data with
    a `video` or `image` file and the same parameters as form fields. Answers 202 with the queued job and its
    Location."""
    state = app_state(request)
    settings = state.settings
    deadline_seconds = cancel_after_seconds(cancel_after, settings.max_cancel_after_seconds)
    if idempotency_key is None and settings.enabled_variants == [settings.variant]:
        await run_in_threadpool(state.submitter.check_capacity, settings.variant)  # before reading the upload
    with tempfile.TemporaryDirectory(prefix="mmaudio-upload-") as tmp:
        body = await read_submit_body(
            request.headers.get("content-type"),
            request.headers.get("content-length"),
            request.stream(),
            Path(tmp),
            settings.max_upload_bytes,
        )
        submitted = await run_in_threadpool(
            state.submitter.submit, owner, body, idempotency_key, base_url(request), Path(tmp), deadline_seconds
        )
    record = submitted.record
    headers = {"Location": job_url(base_url(request), record.id)}
    if submitted.replayed:
        headers["Idempotent-Replayed"] = "true"
    wait = preferred_wait(prefer, settings.max_wait_seconds)
    if wait is not None:
        headers["Preference-Applied"] = f"wait={wait:g}"
        if not record.status.terminal:
            record = await wait_until_finished(state, record.id, wait) or record
    place = await run_in_threadpool(state.jobs.queue_place, record)
    view = job_view(record, base_url(request), place)
    return JSONResponse(view, 200 if record.status.terminal else 202, headers)


@router.get(
    "",
    response_model=JobPage,
    summary="List your jobs",
    responses={code: PROBLEM_RESPONSE for code in (401, 422)},
)
def list_jobs(
    request: Request,
    owner: Owner,
    status: Annotated[
        list[JobStatus] | None,
        Query(description="Only jobs in these statuses (repeatable).", examples=[["queued", "running"]]),
    ] = None,
    limit: Annotated[
        int, Query(ge=1, description="Jobs per page (capped by the deployment).", examples=[20])
    ] = DEFAULT_PAGE_SIZE,
    before: Annotated[
        float | None,
        Query(
            allow_inf_nan=False,
            description="Page cursor: take it from the `next` link.",
            examples=[1735732800.0],
        ),
    ] = None,
) -> Response:
    """The caller's jobs that have not expired, newest first, a page at a time."""
    state = app_state(request)
    limit = min(limit, state.settings.max_page_size)
    records, cursor = state.jobs.owned(owner, limit, before, set(status) if status else None)
    url = base_url(request)
    page = {"jobs": [job_view(record, url, state.jobs.queue_place(record)) for record in records], "next": None}
    if cursor is not None:
        query = [("limit", limit), ("before", repr(cursor)), *(("status", s.value) for s in status or ())]
        page["next"] = f"{url.rstrip('/')}/v1/jobs?{urlencode(query)}"
    return JSONResponse(page)


@router.get(
    "/{job_id}", response_model=Job, summary="Read a job", responses={404: PROBLEM_RESPONSE, 422: PROBLEM_RESPONSE}
)
def get_job(request: Request, job_id: JobId, owner: Owner) -> Response:
    state = app_state(request)
    record = owned_job(state, job_id, owner)
    view = job_view(record, base_url(request), state.jobs.queue_place(record))
    return JSONResponse(view)


@router.get(
    "/{job_id}/events",
    summary="Follow a job (server-sent events)",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}},
        204: {"description": "The client has seen the final revision already (`Last-Event-ID`)."},
        404: PROBLEM_RESPONSE,
        422: PROBLEM_RESPONSE,
    },
)
async def job_events(
    request: Request,
    job_id: JobId,
    owner: Owner,
    last_event: Annotated[
        str | None, Header(alias="Last-Event-ID", description="The id of the last event received.", examples=["7"])
    ] = None,
) -> Response:
    """`event: status` whenever the status changes and `event: progress` for every other change, each with
    the whole job object as data and the job's revision as id; the stream ends after the final status.
    A reconnecting client (`Last-Event-ID`) gets only newer revisions, and 204 once it has seen the final one
    (which tells an EventSource to stop reconnecting)."""
    state = app_state(request)
    record = await run_in_threadpool(owned_job, state, job_id, owner)
    seen = last_event_id(last_event)
    if record.status.terminal and record.revision <= seen:
        return Response(status_code=204)
    return StreamingResponse(
        sse_stream(state, job_id, base_url(request), seen),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.post(
    "/{job_id}/cancel",
    response_model=Job,
    summary="Cancel a job",
    responses={
        202: {"model": Job, "description": "Running: it stops at its next step."},
        **{code: PROBLEM_RESPONSE for code in (404, 409, 422)},
    },
)
def cancel_job(request: Request, job_id: JobId, owner: Owner) -> Response:
    """A queued job is canceled at once (200). A running one is asked to stop (202, `cancel_requested`) and
    becomes canceled after its current sampling step. An ended job cannot be canceled (409)."""
    state = app_state(request)
    record = owned_job(state, job_id, owner)
    if record.status.terminal and record.status is not JobStatus.canceled:
        raise ProblemError("job-not-cancelable", f"The job has {record.status.value}.")
    record = state.jobs.cancel(record) or record
    view = job_view(record, base_url(request), state.jobs.queue_place(record))
    return JSONResponse(view, 200 if record.status.terminal else 202)


@router.delete(
    "/{job_id}",
    status_code=204,
    response_class=Response,
    summary="Delete a job",
    responses={204: {"description": "Deleted."}, **{code: PROBLEM_RESPONSE for code in (401, 404, 422)}},
)
def delete_job(request: Request, job_id: JobId, owner: Owner) -> Response:
    """Cancel the job if it has not ended, and remove it with its upload and results now. Afterwards the job
    is 404 everywhere (read, list, events, result); a job of another API key is 404 as well."""
    state = app_state(request)
    state.jobs.delete(owned_job(state, job_id, owner))
    return Response(status_code=204)


@router.api_route(
    "/{job_id}/result",
    methods=["GET", "HEAD"],
    summary="Download a result",
    response_class=Response,
    responses={
        200: {"content": {media: {} for media in MEDIA_TYPES.values()}},
        206: {"description": "The requested byte range."},
        302: {"description": "S3 store in `redirect` mode: the result at a presigned URL of limited life."},
        **{code: PROBLEM_RESPONSE for code in (404, 409, 416, 422)},
    },
)
def job_result(
    request: Request,
    job_id: JobId,
    owner: Owner,
    format: Annotated[
        ResultFormat | None, Query(description="Default: the job's output_format.", examples=["flac"])
    ] = None,
    sample: Annotated[int, Query(ge=0, description="Which sample (0-based) of a job with several.", examples=[0])] = 0,
    range_header: Annotated[
        str | None, Header(alias="range", description="One byte range (RFC 9110).", examples=["bytes=0-1023"])
    ] = None,
) -> Response:
    """mp4 (video jobs): the uploaded video stream copied unchanged with the generated audio as AAC.
    flac, wav, m4a: the audio alone (wav and m4a are converted from the FLAC on their first download).
    Supports single byte ranges. With the S3 store in `redirect` mode, GET answers 302 to a presigned URL of
    the object (of limited life), which takes the same ranges."""
    state = app_state(request)
    result = state.results.open(owned_job(state, job_id, owner), format, sample)
    headers = {
        "Accept-Ranges": "bytes",
        "Content-Disposition": content_disposition(result.filename),
        "ETag": f'"{job_id}-{sample}-{result.format}-{result.size}"',
        "Cache-Control": "private, max-age=3600",
    }
    span = byte_range(range_header, result.size)
    first, last = span or (0, result.size - 1)
    headers["Content-Length"] = str(last - first + 1)
    status = 200
    if span is not None:
        status = 206
        headers["Content-Range"] = f"bytes {first}-{last}/{result.size}"
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers, media_type=result.media_type)
    # a presigned URL signs GET alone, so HEAD is answered here; the client sends its Range to the store
    redirect = result.store.download_url(result.name, headers["Content-Disposition"], result.media_type)
    if redirect is not None:
        return RedirectResponse(redirect, 302, headers={"Cache-Control": "no-store"})
    return StreamingResponse(
        result.read(first, last), status_code=status, headers=headers, media_type=result.media_type
    )
