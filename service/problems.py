"""RFC 9457 problem details: the stable `type` of every error the service reports.

API errors and the `error` of a failed job share this catalogue, so a client handles both with one table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TYPE_BASE = "urn:mmaudio:problem:"
MEDIA_TYPE = "application/problem+json"


@dataclass(frozen=True)
class ProblemType:
    slug: str
    status: int
    title: str

    @property
    def uri(self) -> str:
        return TYPE_BASE + self.slug


def _catalogue(*types: ProblemType) -> dict[str, ProblemType]:
    return {t.slug: t for t in types}


PROBLEMS = _catalogue(
    # request problems
    ProblemType("malformed-request", 400, "The HTTP request is malformed"),
    ProblemType("unauthorized", 401, "Missing or unknown API key"),
    ProblemType("not-found", 404, "No such resource"),
    ProblemType("method-not-allowed", 405, "Method not allowed"),
    ProblemType("request-timeout", 408, "The client sent the request too slowly"),
    ProblemType("validation-error", 422, "The request is invalid"),
    ProblemType("upload-too-large", 413, "The upload is larger than the service accepts"),
    ProblemType("unsupported-media-type", 415, "Send application/json or multipart/form-data"),
    ProblemType("empty-upload", 422, "The uploaded file is empty"),
    ProblemType("unreadable-media", 415, "The upload is not a video or image the service can read"),
    ProblemType("no-video-stream", 415, "The upload has no video stream"),
    ProblemType("still-image", 415, "The video field holds a still image: send it as `image`"),
    ProblemType("unsupported-codec", 415, "The video codec is not supported"),
    ProblemType("truncated-media", 422, "The upload is cut short"),
    ProblemType("corrupt-media", 422, "The video does not decode"),
    ProblemType("video-too-short", 422, "The video is too short to generate audio for"),
    ProblemType("media-limits", 422, "The video is longer or larger than the service accepts"),
    ProblemType("media-timeout", 422, "Reading the upload took longer than the service allows"),
    ProblemType("url-forbidden", 422, "The input URL (or a redirect) points where the service may not fetch"),
    ProblemType("url-unreachable", 422, "The input URL could not be fetched"),
    ProblemType("url-redirects", 422, "The input URL redirects too many times"),
    ProblemType("url-too-large", 413, "The file at the input URL is larger than the service accepts"),
    ProblemType("url-timeout", 422, "Fetching the input URL took longer than the service allows"),
    ProblemType("variant-unavailable", 422, "This deployment does not serve that model variant"),
    ProblemType("webhooks-disabled", 422, "This deployment does not send webhooks"),
    ProblemType("idempotency-key-reused", 422, "The Idempotency-Key was used for a different request"),
    ProblemType("idempotency-in-progress", 409, "A request with this Idempotency-Key is still being processed"),
    ProblemType("queue-full", 429, "Too many queued jobs, try again later"),
    ProblemType("job-not-finished", 409, "The job has no result yet"),
    ProblemType("job-not-cancelable", 409, "The job has already ended"),
    ProblemType("result-unavailable", 404, "The job has no result in that format or sample"),
    ProblemType("range-not-satisfiable", 416, "The requested byte range is outside the file"),
    ProblemType("service-unavailable", 503, "The service is not ready"),
    ProblemType("internal-error", 500, "Internal error"),
    # reasons a job failed (the job's `error`, status failed)
    ProblemType("worker-lost", 500, "The worker running the job stopped unexpectedly"),
    ProblemType("timeout", 504, "The job ran longer than the service allows"),
    ProblemType("generation-failed", 500, "The model failed to generate audio"),
    ProblemType("unreadable-job", 500, "The job's stored record cannot be read"),
    ProblemType("redis-unavailable", 503, "Redis was unreachable for too long while the job needed it"),
    # why a job was canceled by the service (the job's `error`, status canceled)
    ProblemType("deadline-exceeded", 408, "The job did not finish before its Cancel-After deadline"),
)


def problems_table() -> str:
    """A Markdown table of every problem type: its `type` URI, HTTP status and title (README's and /docs')."""
    rows = ["| `type` | Status | Title |", "|---|---|---|"]
    rows += [f"| `{problem.uri}` | {problem.status} | {problem.title} |" for problem in PROBLEMS.values()]
    return "\n".join(rows)


class ProblemError(Exception):
    """Raised anywhere in a request; the API answers it as problem+json."""

    def __init__(
        self, slug: str, detail: str | None = None, headers: dict[str, str] | None = None, **extensions: Any
    ) -> None:
        self.problem = PROBLEMS[slug]
        self.detail = detail
        self.headers = headers or {}
        self.extensions = extensions
        super().__init__(detail or self.problem.title)

    def body(self, instance: str | None = None) -> dict[str, Any]:
        return problem_body(self.problem.slug, self.detail, instance, **self.extensions)


def problem_body(slug: str, detail: str | None = None, instance: str | None = None, **extensions: Any) -> dict:
    problem = PROBLEMS[slug]
    body: dict[str, Any] = {"type": problem.uri, "title": problem.title, "status": problem.status}
    if detail:
        body["detail"] = detail
    if instance:
        body["instance"] = instance
    return body | extensions


if __name__ == "__main__":
    print(problems_table())
