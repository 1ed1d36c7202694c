"""The public shapes of the /v1 API (pydantic v2): what a client sends and what it gets back."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from model.request import REQUEST_PARAMETERS
from model.sequence import AUDIO_16K, AUDIO_44K, MIN_DURATION  # the shortest clip the model can condition on
from model.windows import WindowSchedule
from service.settings import Settings, Variant

MAX_SEED = 2**63 - 1
JOB_EXAMPLE_ID = "3f0c6d4e-8a1b-4c2d-9e7f-1a2b3c4d5e6f"
JOB_EXAMPLE_URL = f"http://localhost:8000/v1/jobs/{JOB_EXAMPLE_ID}"
PROBLEM_EXAMPLE = "urn:mmaudio:problem:corrupt-media"


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
DEFAULT_DURATION: float = GENERATION_PARAMETERS["duration"].default  # of a job without a video
WHOLE_VIDEO = "video"  # the duration that means: as long as the uploaded video
Duration = Annotated[float, Field(ge=MIN_DURATION)] | Literal["video"]
GENERATION_EXAMPLES = {
    "prompt": "waves crashing on rocks",
    "negative_prompt": "music, voices",
    "duration": 8.0,
    "num_steps": 25,
    "cfg_strength": 4.5,
    "mask_away_clip": False,
    "num_samples": 1,
}


def generation_parameter(name: str, required: bool = False, **constraints: Any) -> Any:
    """A job parameter that is a generation parameter: its default (unless ``required``) and text from
    model.request's one table, with the API's bounds."""
    item = GENERATION_PARAMETERS[name]
    text = item.metadata["help"]
    return Field(
        ... if required else item.default,
        description=f"{text[:1].upper()}{text[1:]}.",
        examples=[GENERATION_EXAMPLES[name]],
        **constraints,
    )


class JobParams(BaseModel):
    """What a client may set on submit. Defaults follow the official demo.

    Limits that depend on the deployment (max duration, steps, samples, prompt length, variants) are checked
    against the Settings passed as validation context.
    """

    model_config = ConfigDict(extra="forbid")

    prompt: str = generation_parameter("prompt")
    negative_prompt: str = generation_parameter("negative_prompt")
    duration: Duration | None = Field(
        None,
        description=f"Seconds of audio, or `{WHOLE_VIDEO}`: as long as the uploaded video (the default with a "
        f"video; a longer number is shortened to the video). Without a video the default is {DEFAULT_DURATION:g}.",
        examples=[8.0, WHOLE_VIDEO],
    )
    num_steps: int = generation_parameter("num_steps", ge=1)
    cfg_strength: float = generation_parameter("cfg_strength", ge=0.0, le=20.0)
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="Random seed; drawn by the service when absent.", examples=[42]
    )
    mask_away_clip: bool = generation_parameter("mask_away_clip")
    num_samples: int = generation_parameter("num_samples", ge=1)
    variant: Variant | None = Field(
        None, description="Model variant; the deployment's default when absent.", examples=["large_44k_v2"]
    )
    output_format: ResultFormat | None = Field(
        None, description="Default format of /result: mp4 for video jobs, flac otherwise.", examples=["mp4"]
    )
    webhook_url: str | None = Field(
        None,
        max_length=2048,
        description="Receives a signed POST of the finished job.",
        examples=["https://example.com/hooks/mmaudio"],
    )
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
    def _deployment_limit(cls, value: float | str | None, info: ValidationInfo) -> float | str | None:
        limit = getattr(_settings(info), DEPLOYMENT_LIMITS[info.field_name])
        if isinstance(value, int | float) and value > limit:
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
        if self.duration == WHOLE_VIDEO and context.get("input_kind") != "video":
            raise ValueError(f"duration {WHOLE_VIDEO!r} needs a video upload")
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

    prompt: str = generation_parameter("prompt", required=True)
    negative_prompt: str = generation_parameter("negative_prompt", required=True)
    duration: float = Field(
        description="Seconds the job was sized for at submit (batching, timeout): the requested duration, or the "
        "video's length when shorter or when the whole video was asked. result.duration is the exact length made.",
        examples=[8.0],
    )
    requested_duration: Duration | None = Field(
        None,
        description=f"The duration asked for (`{WHOLE_VIDEO}`: the whole video, also when omitted with a video); "
        "null in jobs made before it was recorded.",
        examples=[WHOLE_VIDEO],
    )
    num_steps: int = generation_parameter("num_steps", required=True)
    cfg_strength: float = generation_parameter("cfg_strength", required=True)
    seed: int = Field(description="The random seed used (the client's, or the one drawn).", examples=[1234567])
    mask_away_clip: bool = generation_parameter("mask_away_clip", required=True)
    num_samples: int = generation_parameter("num_samples", required=True)
    variant: str = Field(description="The model variant that runs the job.", examples=["large_44k_v2"])
    output_format: ResultFormat = Field(description="The default format of /result.", examples=["mp4"])
    sample_rate: int | None = Field(
        None,
        description="Sample rate of the results (null in jobs made before it could be chosen: the variant's).",
        examples=[48000],
    )

    @property
    def generation_duration(self) -> float | None:
        """What the pipeline is asked for: seconds (it shortens them to the video itself), or None for the whole
        video."""
        if self.requested_duration == WHOLE_VIDEO:
            return None
        return self.duration if self.requested_duration is None else self.requested_duration


class Progress(BaseModel):
    stage: str = Field(
        description="queued, video, features, sampling, decoding, encoding or done.", examples=["sampling"]
    )
    fraction: float = Field(description="Share of the stage done, 0 to 1.", examples=[0.4])
    window: int | None = Field(None, description="While sampling: the window being sampled (1-based).", examples=[1])
    windows: int | None = Field(None, description="While sampling: how many windows the job has.", examples=[1])
    step: int | None = Field(None, description="While sampling: steps done in the current window.", examples=[10])
    steps: int | None = Field(None, description="While sampling: steps per window.", examples=[25])


class MediaSummary(BaseModel):
    duration: float | None = Field(None, description="Seconds of video.", examples=[8.04])
    width: int | None = Field(None, description="Width in pixels, as displayed.", examples=[1280])
    height: int | None = Field(None, description="Height in pixels, as displayed.", examples=[720])
    fps: float | None = Field(None, description="Frames per second.", examples=[25.0])
    codec: str | None = Field(None, description="Video codec (FFmpeg's name).", examples=["h264"])
    has_audio: bool | None = Field(None, description="Whether the upload has an audio track.", examples=[True])
    timestamped: bool | None = Field(None, description="False for a raw stream without a container.", examples=[True])


class InputInfo(BaseModel):
    kind: InputKind = Field(description="What conditions the audio: a video, an image or text.", examples=["video"])
    url: str | None = Field(
        None,
        description="The video_url or image_url the input was fetched from.",
        examples=["https://example.com/clip.mp4"],
    )
    filename: str | None = Field(None, description="The upload's file name, made safe.", examples=["clip.mp4"])
    size: int | None = Field(None, description="Bytes uploaded.", examples=[1048576])
    sha256: str | None = Field(None, description="SHA-256 of the upload (hex).", examples=["9f86d081884c7d65" * 4])
    media: MediaSummary | None = Field(None, description="What the probe found in the upload.")


class WeightsInfo(BaseModel):
    kind: str = Field(description="official or tiny.", examples=["official"])
    random_weights: bool = Field(
        description="True for the tiny preset: random weights, not a real model.", examples=[False]
    )
    id: str | None = Field(
        None,
        description="Identity of the loaded weights (known once a worker runs the job).",
        examples=["large_44k_v2:3f2a9c0d"],
    )
    note: str | None = Field(
        None, description="A warning about the weights, if any.", examples=["random weights: the audio is noise"]
    )


class ModelInfo(BaseModel):
    variant: str = Field(description="The model variant.", examples=["large_44k_v2"])
    weights: WeightsInfo = Field(description="The weights it runs with.")
    dtype_fallback: str | None = Field(
        None,
        description="Set when the job's float16 batch overflowed and was run again in this dtype.",
        examples=["bfloat16"],
    )


class JobError(BaseModel):
    type: str = Field(description="The problem type (see the table of problem types).", examples=[PROBLEM_EXAMPLE])
    title: str = Field(description="The problem type's title.", examples=["The video does not decode"])
    status: int = Field(description="The HTTP status of the problem type.", examples=[422])
    detail: str | None = Field(None, description="What happened to this job.", examples=["frame 112 is corrupt"])


class ResultFile(BaseModel):
    sample: int = Field(description="Which sample (0-based).", examples=[0])
    format: ResultFormat = Field(description="The file's format.", examples=["flac"])
    size: int | None = Field(description="Bytes; None until a converted format is first downloaded.", examples=[412345])
    href: str = Field(description="Where to download it.", examples=[f"{JOB_EXAMPLE_URL}/result?format=flac&sample=0"])


class WindowsInfo(BaseModel):
    count: int = Field(description="How many overlapping windows were generated.", examples=[100])
    overlap_seconds: float = Field(
        description="Seconds each window shares with the next (MMAUDIO_WINDOW_OVERLAP_SECONDS).", examples=[2.0]
    )
    schedule: WindowSchedule = Field(
        description="The order they were sampled in (MMAUDIO_WINDOW_SCHEDULE).", examples=["batched"]
    )


class ResultInfo(BaseModel):
    duration: float = Field(
        description="Seconds of generated audio (a short video shortens the request).", examples=[8.0]
    )
    sample_rate: int = Field(description="Samples per second of the audio.", examples=[44100])
    num_samples: int = Field(description="How many samples were generated.", examples=[1])
    formats: list[ResultFormat] = Field(
        description="Formats each sample can be downloaded in.", examples=[["mp4", "flac", "wav", "m4a"]]
    )
    files: list[ResultFile] = Field(description="Every sample in every format.")
    windows: WindowsInfo | None = Field(
        None,
        description="How audio longer than one window (8 s) was generated: overlapping windows joined with "
        "crossfades. Null for a single pass.",
    )
    expires_at: datetime = Field(
        description="When the job and its files are deleted.", examples=["2025-01-01T13:00:00Z"]
    )


class WebhookInfo(BaseModel):
    url: str = Field(description="The receiver.", examples=["https://example.com/hooks/mmaudio"])
    events: list[WebhookEvent] = Field(
        ["completed"], description="The events this job sends webhooks for.", examples=[["started", "completed"]]
    )
    status: Literal["pending", "delivered", "failed"] | None = Field(
        description="The `completed` delivery's state (failed: every retry failed); null when it is not one of "
        "the events.",
        examples=["delivered"],
    )
    attempts: int = Field(0, description="Deliveries of `completed` tried so far.", examples=[1])
    last_error: str | None = Field(None, description="Why the last try failed.", examples=["HTTP 502"])


class StoredResult(BaseModel):
    """What the job record keeps of its stored files (the public ResultInfo is made from it)."""

    duration: float
    sample_rate: int
    num_samples: int
    formats: list[ResultFormat] = Field(description="Written by the worker; other audio formats are converted.")
    sizes: dict[str, int] = Field(description="Bytes by '<sample>.<format>'.")
    ttl_seconds: int
    windows: WindowsInfo | None = None


class WebhookState(WebhookInfo):
    """The job record's webhook: the public part, and the base URL its job object's links are made with."""

    base_url: str


class Links(BaseModel):
    self: str = Field(description="The job.", examples=[JOB_EXAMPLE_URL])
    events: str = Field(description="Its server-sent events.", examples=[f"{JOB_EXAMPLE_URL}/events"])
    cancel: str = Field(description="POST here to cancel it.", examples=[f"{JOB_EXAMPLE_URL}/cancel"])
    result: str | None = Field(
        None,
        description="The result in the job's output format (once it succeeded).",
        examples=[f"{JOB_EXAMPLE_URL}/result?format=mp4&sample=0"],
    )


class Job(BaseModel):
    id: str = Field(description="The job's id (a UUID).", examples=[JOB_EXAMPLE_ID])
    status: JobStatus = Field(description="Where the job is in its life.", examples=["running"])
    queue_position: int | None = Field(
        None,
        description="1 = the next job a worker takes; only while queued. Exact near the head of the queue "
        "(MMAUDIO_QUEUE_POSITION_SCAN), estimated further back.",
        examples=[1],
    )
    estimated_start_at: datetime | None = Field(
        None,
        description="When a worker should start this queued job: its position times the recent interval between "
        "job starts of its variant. Null unless queued, and while no worker serves the variant.",
        examples=["2025-01-01T12:00:05Z"],
    )
    progress: Progress | None = Field(None, description="The stage running and how far it is.")
    cancel_requested: bool = Field(
        False, description="A cancel was asked while it ran: it stops at its next step.", examples=[False]
    )
    created_at: datetime = Field(description="When it was submitted.", examples=["2025-01-01T12:00:00Z"])
    started_at: datetime | None = Field(
        None, description="When a worker started it.", examples=["2025-01-01T12:00:01Z"]
    )
    finished_at: datetime | None = Field(None, description="When it ended.", examples=["2025-01-01T12:00:09Z"])
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
        examples=[
            {
                "queue": 0.8,
                "input": 0.3,
                "model": {"features": 0.4, "sampling": 5.1},
                "encode": 0.2,
                "total": 7.0,
                "batch_size": 1,
                "prepared_ahead": False,
            }
        ],
    )
    params: EffectiveParams = Field(description="The parameters it runs with, the seed included.")
    input: InputInfo = Field(description="What it was given.")
    model: ModelInfo = Field(description="The model that runs it.")
    result: ResultInfo | None = Field(None, description="Its files, once it succeeded.")
    error: JobError | None = Field(None, description="Why it failed (a problem, as the API's errors).")
    attempts: int = Field(
        0, description="Times a worker started this job (2 after a retry of an abandoned job).", examples=[1]
    )
    worker: str | None = Field(None, description="The worker that ran it.", examples=["worker-host-1234"])
    webhook: WebhookInfo | None = Field(None, description="Its webhook's delivery, when it has one.")
    links: Links = Field(description="Where to read, follow, cancel and download it.")


class JobPage(BaseModel):
    """One page of the caller's jobs, newest first."""

    jobs: list[Job] = Field(description="The jobs of this page, newest first.")
    next: str | None = Field(
        None,
        description="URL of the next (older) page; null on the last page.",
        examples=["http://localhost:8000/v1/jobs?limit=20&before=1735732800.0"],
    )


class ServiceLimits(BaseModel):
    max_duration: float = Field(description="Longest audio a job may ask for, in seconds.", examples=[30.0])
    max_num_steps: int = Field(description="Most sampling steps a job may ask for.", examples=[100])
    max_num_samples: int = Field(description="Most samples one job may ask for.", examples=[4])
    max_prompt_chars: int = Field(description="Longest prompt or negative prompt.", examples=[1000])
    max_upload_bytes: int = Field(description="Largest accepted upload.", examples=[268435456])


class ServiceInfo(BaseModel):
    """What a client (the browser page) needs to know before it submits; answered without an API key."""

    api_keys_required: bool = Field(
        description="True when every other /v1 call needs `Authorization: Bearer <key>`.", examples=[False]
    )
    default_variant: str = Field(description="The variant a job runs when it names none.", examples=["large_44k_v2"])
    variants: list[str] = Field(description="Variants a job may ask for.", examples=[["large_44k_v2", "small_16k"]])
    weights: WeightsInfo = Field(description="The weights the workers serve.")
    formats: list[ResultFormat] = Field(
        description="Output formats (mp4 needs a video).", examples=[["mp4", "flac", "wav", "m4a"]]
    )
    limits: ServiceLimits = Field(description="The deployment's limits on a job.")


class ProblemDetails(BaseModel):
    """RFC 9457 problem details, the body of every error (media type application/problem+json)."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(
        description="The problem type: a stable URN (see the table of problem types).", examples=[PROBLEM_EXAMPLE]
    )
    title: str = Field(description="The problem type's title.", examples=["The video does not decode"])
    status: int = Field(description="The HTTP status.", examples=[422])
    detail: str | None = Field(None, description="What was wrong with this request.", examples=["duration: at most 30"])
    instance: str | None = Field(None, description="The path of the request.", examples=["/v1/jobs"])
