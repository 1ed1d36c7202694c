"""The public shapes of the /v1 API (pydantic v2): what a client sends and what it gets back."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from model.request import REQUEST_PARAMETERS
from model.sequence import AUDIO_16K, AUDIO_44K, MIN_DURATION  # the shortest clip the model can condition on
from service.settings import Settings, Variant

MAX_SEED = 2**63 - 1


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.canceled)


InputKind = Literal["video", "image", "text"]
ResultFormat = Literal["mp4", "flac", "wav", "m4a"]
WebhookEvent = Literal["started", "progress", "completed"]

OUTPUT_SAMPLE_RATE = 48000  # the rate a job may ask for besides its variant's own (video editors, containers)
NATIVE_SAMPLE_RATES = {
    variant: AUDIO_16K.sampling_rate if variant == "small_16k" else AUDIO_44K.sampling_rate
    for variant in get_args(Variant)
}


# parameter -> the setting that bounds it
DEPLOYMENT_LIMITS = {"duration": "max_duration", "num_steps": "max_num_steps", "num_samples": "max_num_samples"}


GENERATION_PARAMETERS = {item.name: item for item in REQUEST_PARAMETERS}


def generation_parameter(name: str, **constraints: Any) -> Any:
    """A job parameter that is a generation parameter: its default and text from model.request's one table,
    with the API's bounds."""
    item = GENERATION_PARAMETERS[name]
    text = item.metadata["help"]
    return Field(item.default, description=f"{text[:1].upper()}{text[1:]}.", **constraints)


class JobParams(BaseModel):
    """What a client may set on submit. Defaults follow the official demo.

    Limits that depend on the deployment (max duration, steps, samples, prompt length, variants) are checked
    against the Settings passed as validation context.
    """

    model_config = ConfigDict(extra="forbid")

    prompt: str = generation_parameter("prompt")
    negative_prompt: str = generation_parameter("negative_prompt")
    duration: float = generation_parameter("duration", ge=MIN_DURATION)
    num_steps: int = generation_parameter("num_steps", ge=1)
    cfg_strength: float = generation_parameter("cfg_strength", ge=0.0, le=20.0)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Random seed; drawn by the service when absent.")
    mask_away_clip: bool = generation_parameter("mask_away_clip")
    num_samples: int = generation_parameter("num_samples", ge=1)
    variant: Variant | None = Field(None, description="Model variant; the deployment's default when absent.")
    output_format: ResultFormat | None = Field(
        None, description="Default format of /result: mp4 for video jobs, flac otherwise."
    )
    webhook_url: str | None = Field(None, max_length=2048, description="Receives a signed POST of the finished job.")
    webhook_events: list[WebhookEvent] | None = Field(
        None,
        min_length=1,
        description="Which webhooks to send: `started` (a worker took the job), `progress` (throttled by the "
        "deployment) and `completed` (the job ended). Default: completed only. In a form: comma-separated.",
        examples=[["started", "progress", "completed"]],
    )
    video_url: str | None = Field(
        None,
        max_length=2048,
        description="A video to fetch (JSON submits): a public http(s) URL, instead of uploading the file.",
        examples=["https://example.com/clip.mp4"],
    )
    image_url: str | None = Field(
        None,
        max_length=2048,
        description="A still image to fetch (JSON submits): a public http(s) URL, instead of uploading the file.",
        examples=["https://example.com/photo.jpg"],
    )
    sample_rate: int | None = Field(
        None,
        description=f"Sample rate of the results: the variant's own (16000 for small_16k, 44100 otherwise; "
        f"the default) or {OUTPUT_SAMPLE_RATE} (resampled).",
        examples=[OUTPUT_SAMPLE_RATE],
    )

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _prompt_length(cls, value: str, info: ValidationInfo) -> str:
        limit = _settings(info).max_prompt_chars
        if len(value) > limit:
            raise ValueError(f"at most {limit} characters")
        return value

    @field_validator("duration", "num_steps", "num_samples")
    @classmethod
    def _deployment_limit(cls, value: float, info: ValidationInfo) -> float:
        limit = getattr(_settings(info), DEPLOYMENT_LIMITS[info.field_name])
        if value > limit:
            raise ValueError(f"at most {limit}")
        return value

    @field_validator("webhook_url", "video_url", "image_url")
    @classmethod
    def _http_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.lower().startswith(("http://", "https://")):
            raise ValueError("must be an http or https URL")
        return value

    @field_validator("webhook_events", mode="before")
    @classmethod
    def _comma_separated_events(cls, value: object) -> object:
        if isinstance(value, str):  # a form field
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("webhook_events")
    @classmethod
    def _distinct_events(cls, value: list[WebhookEvent] | None) -> list[WebhookEvent] | None:
        return None if value is None else list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _format_fits_input(self, info: ValidationInfo) -> JobParams:
        context = info.context or {}
        if self.output_format == "mp4" and context.get("input_kind") != "video":
            raise ValueError("output_format mp4 needs a video upload")
        if self.webhook_events is not None and self.webhook_url is None:
            raise ValueError("webhook_events needs a webhook_url")
        if self.video_url is not None and self.image_url is not None:
            raise ValueError("send one of video_url and image_url")
        return self


def _settings(info: ValidationInfo) -> Settings:
    context = info.context or {}
    settings = context.get("settings")
    if settings is None:
        raise RuntimeError("JobParams are validated with the service settings as context")
    return settings


class EffectiveParams(BaseModel):
    """The parameters a job runs with: the client's, completed with defaults and the drawn seed."""

    prompt: str
    negative_prompt: str
    duration: float
    num_steps: int
    cfg_strength: float
    seed: int
    mask_away_clip: bool
    num_samples: int
    variant: str
    output_format: ResultFormat
    sample_rate: int | None = Field(
        None,
        description="Sample rate of the results (null in jobs made before it could be chosen: the variant's).",
        examples=[48000],
    )


class Progress(BaseModel):
    stage: str = Field(description="queued, video, features, sampling, decoding, encoding or done.")
    fraction: float = Field(description="Share of the stage done, 0 to 1.")
    window: int | None = Field(None, description="While sampling: the window being sampled (1-based).")
    windows: int | None = Field(None, description="While sampling: how many windows the job has.")
    step: int | None = Field(None, description="While sampling: steps done in the current window.")
    steps: int | None = Field(None, description="While sampling: steps per window.")


class MediaSummary(BaseModel):
    duration: float | None = None
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    codec: str | None = None
    has_audio: bool | None = None
    timestamped: bool | None = Field(None, description="False for a raw stream without a container.")


class InputInfo(BaseModel):
    kind: InputKind
    url: str | None = Field(
        None,
        description="The video_url or image_url the input was fetched from.",
        examples=["https://example.com/clip.mp4"],
    )
    filename: str | None = None
    size: int | None = None
    sha256: str | None = None
    media: MediaSummary | None = None


class WeightsInfo(BaseModel):
    kind: str = Field(description="official or tiny")
    random_weights: bool = Field(description="True for the tiny preset: random weights, not a real model.")
    id: str | None = Field(None, description="Identity of the loaded weights (known once a worker runs the job).")
    note: str | None = None


class ModelInfo(BaseModel):
    variant: str
    weights: WeightsInfo


class JobError(BaseModel):
    type: str
    title: str
    status: int
    detail: str | None = None


class ResultFile(BaseModel):
    sample: int
    format: ResultFormat
    size: int | None = Field(description="Bytes; None until a converted format is first downloaded.")
    href: str


class ResultInfo(BaseModel):
    duration: float = Field(description="Seconds of generated audio (a short video shortens the request).")
    sample_rate: int
    num_samples: int
    formats: list[ResultFormat]
    files: list[ResultFile]
    expires_at: datetime


class WebhookInfo(BaseModel):
    url: str
    events: list[WebhookEvent] = Field(
        ["completed"], description="The events this job sends webhooks for.", examples=[["started", "completed"]]
    )
    status: Literal["pending", "delivered", "failed"] | None = Field(
        description="The `completed` delivery's state (status, attempts, last_error); null when it is not one "
        "of the events.",
        examples=["delivered"],
    )
    attempts: int = 0
    last_error: str | None = None


class StoredResult(BaseModel):
    """What the job record keeps of its stored files (the public ResultInfo is made from it)."""

    duration: float
    sample_rate: int
    num_samples: int
    formats: list[ResultFormat] = Field(description="Written by the worker; other audio formats are converted.")
    sizes: dict[str, int] = Field(description="Bytes by '<sample>.<format>'.")
    ttl_seconds: int


class WebhookState(WebhookInfo):
    """The job record's webhook: the public part, and the base URL its job object's links are made with."""

    base_url: str


class Links(BaseModel):
    self: str
    events: str
    cancel: str
    result: str | None = None


class Job(BaseModel):
    id: str
    status: JobStatus
    queue_position: int | None = Field(None, description="1 = the next job a worker takes; only while queued.")
    progress: Progress | None = None
    cancel_requested: bool = False
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    deadline: datetime | None = Field(
        None,
        description="From the submit's `Cancel-After`: the job is canceled (error `deadline-exceeded`) if it has "
        "not finished by then.",
        examples=["2026-01-01T12:01:30Z"],
    )
    timings: dict[str, Any] = Field(
        default_factory=dict,
        description="Seconds per stage: queue, input, model (the pipeline's own stages), encode, total; "
        "batch_size (jobs computed together) and prepared_ahead (input decoded while the worker was busy).",
    )
    params: EffectiveParams
    input: InputInfo
    model: ModelInfo
    result: ResultInfo | None = None
    error: JobError | None = None
    attempts: int = Field(0, description="Times a worker started this job (2 after a retry of an abandoned job).")
    worker: str | None = None
    webhook: WebhookInfo | None = None
    links: Links


class JobPage(BaseModel):
    """One page of the caller's jobs, newest first."""

    jobs: list[Job]
    next: str | None = Field(None, description="URL of the next (older) page; null on the last page.")


class ProblemDetails(BaseModel):
    """RFC 9457 problem details, the body of every error (media type application/problem+json)."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
