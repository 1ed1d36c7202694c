"""Every setting of the service, read from MMAUDIO_* environment variables (or a .env file).

One object serves the API, the workers and the `serve` launcher, so a deployment configures all three the
same way. Each field's description is the documentation: README's settings table is generated from it
(`python -m service.settings` prints the table).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from model.frame_path import FramePath
from model.weights.manifest import DEFAULT_WEIGHTS_DIR

REPO_ROOT = Path(__file__).resolve().parent.parent

Variant = Literal["small_16k", "small_44k", "medium_44k", "large_44k", "large_44k_v2"]


def _split_list(value: object) -> object:
    """Comma-separated environment values become lists; lists pass through."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MMAUDIO_", env_file=".env", extra="ignore")

    # --- model --------------------------------------------------------------------------------------------------
    variant: Variant = Field("large_44k_v2", description="Model variant a worker loads and the API's default.")
    variants: Annotated[list[Variant], NoDecode] = Field(
        default_factory=list,
        description="Variants clients may ask for (comma-separated); each needs workers started with that "
        "MMAUDIO_VARIANT. Empty: only `variant`.",
    )
    weights: Literal["official", "tiny"] = Field(
        "official",
        description="`official`: the released checkpoints (downloaded on first start). `tiny`: small random "
        "weights, offline, for tests and demos; every job response says so.",
    )
    weights_dir: Path = Field(DEFAULT_WEIGHTS_DIR, description="Folder holding (or receiving) the official weights.")
    device: str | None = Field(None, description="Torch device of the workers (`cuda`, `cuda:1`, `cpu`). Empty: auto.")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="Compute dtype of the workers. Empty: the pipeline's default for the device."
    )
    warmup: bool = Field(
        True, description="A worker runs one short generation after loading, before it reports ready and takes jobs."
    )
    frame_path: FramePath = Field(
        "exact",
        description="Video frame resizing: `exact` reproduces the official frames; `fast` scales in libswscale "
        "(several times cheaper, a few uint8 codes off).",
    )
    # GPU speed (issue 13)
    compile: bool = Field(
        False,
        description="torch.compile the flow step (inside its CUDA graph), CLIP's image tower, the Synchformer and "
        "the vocoder's activations; each new batch shape compiles once (minutes on a CPU: keep it off there).",
    )
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = Field(
        "default", description="Inductor mode when `compile` is on (never inductor's own CUDA graphs)."
    )
    cudnn_benchmark: bool = Field(
        True, description="On CUDA, let cuDNN time its convolution algorithms once per (fixed) batch shape."
    )

    # --- processes ----------------------------------------------------------------------------------------------
    redis_url: str | None = Field(
        None,
        description="Redis shared by the API and the workers. Empty: `serve` starts a local redis-server "
        "(see `redis_port`, `data_dir`).",
    )
    redis_port: int = Field(6379, description="Port of the redis-server that `serve` starts when `redis_url` is empty.")
    data_dir: Path = Field(Path("data"), description="Where `serve` keeps its redis-server's files.")
    redis_reconnect_max_seconds: float = Field(
        10.0, gt=0, description="Longest pause of a worker between tries to reach an unreachable Redis."
    )
    unavailable_retry_seconds: int = Field(
        5, gt=0, description="`Retry-After` of the 503 that the API answers while Redis is unreachable."
    )
    host: str = Field("0.0.0.0", description="Address the API listens on.")
    port: int = Field(8000, description="Port the API listens on.")
    workers: int = Field(1, ge=0, description="Worker processes `serve` starts next to the API.")
    restart_attempts: int = Field(
        5,
        ge=1,
        description="Quick deaths in a row of one child of `serve` (Redis, the API, a worker) after which it "
        "stops the service and exits 1.",
    )
    base_url: str | None = Field(
        None, description="Public URL of the API used in links and webhooks (behind a proxy). Empty: from each request."
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Browser origins allowed to call the API (comma-separated, `*` for any). Empty: no CORS.",
    )

    # --- access -------------------------------------------------------------------------------------------------
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="SHA-256 hex digests of the accepted API keys (comma-separated, optionally `name:digest`). "
        "With any key configured every /v1 call needs `Authorization: Bearer <key>`, and a key sees only its "
        "own jobs.",
    )
    api_keys_file: Path | None = Field(
        None, description="File with more keys, one `digest` or `name:digest` per line (`#` starts a comment)."
    )

    # --- limits -------------------------------------------------------------------------------------------------
    max_upload_bytes: int = Field(
        480 * 2**20,
        gt=0,
        description="Largest accepted upload; enforced while streaming. The default lets an mp4 result (the "
        "upload's video stream plus its AAC) stay under Redis's 512 MiB string limit in the `redis` store.",
    )
    max_video_seconds: float = Field(
        600.0, gt=0, description="Longest accepted video (a longer one is refused whatever duration is asked)."
    )
    max_video_side: int = Field(4096, gt=0, description="Largest accepted width or height of a video or image.")
    max_prompt_chars: int = Field(1000, gt=0, description="Longest accepted prompt or negative prompt.")
    max_duration: float = Field(
        600.0,
        gt=0,
        description="Longest audio a job may ask for, in seconds; a video job without a duration (the whole "
        "video) is refused when its video is longer.",
    )
    max_num_steps: int = Field(100, gt=0, description="Most sampling steps a job may ask for.")
    max_num_samples: int = Field(4, gt=0, description="Most samples one job may ask for.")
    max_queue: int = Field(100, gt=0, description="Queued jobs per variant beyond which submits get 429.")
    drain_window_seconds: float = Field(
        300.0, gt=0, description="Recent past over which the drain rate behind a 429's Retry-After is measured."
    )
    max_wait_seconds: float = Field(60.0, ge=0, description="Cap on `Prefer: wait=N`.")
    max_page_size: int = Field(100, gt=0, description="Cap on `limit` of a job listing (`GET /v1/jobs`).")
    header_timeout_seconds: float = Field(
        10.0, gt=0, description="Time a client has to send a request's line and headers (else 408, closed)."
    )
    body_idle_timeout_seconds: float = Field(
        30.0, gt=0, description="Longest pause within a request body before the connection is closed (408)."
    )
    upload_timeout_seconds: float = Field(
        900.0, gt=0, description="Time a client has to send a whole request body, however it trickles (408)."
    )
    probe_processes: int = Field(
        2, ge=1, description="Child processes of the API that probe uploads (a crash or hang on a file costs one)."
    )
    probe_timeout_seconds: float = Field(20.0, gt=0, description="An upload that takes longer to probe gets 422.")

    # --- jobs ---------------------------------------------------------------------------------------------------
    max_batch: int = Field(
        8,
        ge=1,
        description="Most samples a worker computes in one batched pass: it takes the oldest queued job and the "
        "next ones with the same duration and step count, as many as are queued and fit (it never waits for "
        "more). 1 disables batching.",
    )
    job_timeout_seconds: float = Field(
        600.0,
        gt=0,
        description="A running job that takes longer than this plus `job_seconds_per_minute` per generated "
        "minute fails (`timeout`).",
    )
    result_ttl_seconds: int = Field(3600, gt=0, description="How long finished jobs and their results are kept.")
    upload_ttl_seconds: int = Field(
        86400, gt=0, description="Safety expiry of uploads; they are deleted as soon as their job ends anyway."
    )
    retry_abandoned_jobs: bool = Field(
        False,
        description="A job whose worker died (no heartbeat) is queued once more instead of failing with `worker-lost`.",
    )
    worker_heartbeat_seconds: float = Field(5.0, gt=0, description="How often a worker renews its heartbeat.")
    worker_ttl_seconds: float = Field(
        30.0, gt=0, description="A worker silent this long is dead; its running job is abandoned."
    )
    maintenance_interval_seconds: float = Field(
        1.0, gt=0, description="How often the API looks for abandoned jobs, due webhooks and expired files."
    )
    worker_stable_seconds: float = Field(
        10.0,
        ge=0,
        description="How long a worker must run after its model loaded (and warmed up) before it counts as ready "
        "in `/readyz`: a worker that keeps crashing sooner never makes the service ready.",
    )
    worker_redis_retry_seconds: float = Field(
        300.0,
        gt=0,
        description="How long a worker retries a running job's input fetch and result storage while Redis is "
        "unreachable before the job fails (`redis-unavailable`); the job's final status is retried until Redis "
        "answers.",
    )

    # --- long videos --------------------------------------------------------------------------------------------
    job_seconds_per_minute: float = Field(
        60.0,
        ge=0,
        description="Time a job may run per minute of audio it generates (duration x num_samples), on top of "
        "`job_timeout_seconds`; also the RQ timeout of its queue entry.",
    )
    batch_max_duration: float = Field(
        8.0,
        gt=0,
        description="Jobs asking for more seconds than this (more than one 8 s window of the model) are "
        "claimed alone, never batched with other jobs.",
    )
    window_overlap_seconds: int = Field(
        2,
        ge=1,
        le=3,
        description="Seconds two neighbouring 8 s windows of a long request share (pinned to the neighbour's "
        "latents while sampling, then crossfaded).",
    )
    window_schedule: Literal["batched", "sequential"] = Field(
        "batched",
        description="`batched`: every other window in one batched pass, then the ones between them pinned at both "
        "ends; `sequential`: left to right, each window pinned to the one before.",
    )
    window_batch: int = Field(
        16,
        ge=1,
        description="Windows of a long request sampled and decoded in one call: bounds the worker's memory (each "
        "window in a decoding call holds its vocoder's activations: about 45 MB with the tiny weights on a CPU).",
    )
    encoder_chunk: int = Field(
        64,
        ge=1,
        description="Video frames (CLIP) or segments (Synchformer) per encoder call, and frames decoded ahead of "
        "it: bounds the encoders' activation memory.",
    )

    # --- storage ------------------------------------------------------------------------------------------------
    storage: Literal["redis", "filesystem", "s3"] = Field(
        "redis",
        description="Where uploads and results live: `redis` (nothing shared but Redis), `filesystem` "
        "(a volume every API and worker mounts at `storage_dir`) or `s3` (an S3-compatible bucket, `s3_*`).",
    )
    storage_dir: Path = Field(Path("data/storage"), description="Root of the filesystem store.")
    # S3 credentials come from boto3's usual chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, roles)
    s3_bucket: str | None = Field(None, description="Bucket of the S3 store (required with `storage=s3`).")
    s3_prefix: str = Field(
        "mmaudio/",
        description="Prefix of every object key the service writes; its upkeep (expiry, aborting stale multipart "
        "uploads) and the README's lifecycle rule act under it only.",
    )
    s3_endpoint_url: str | None = Field(
        None, description="Endpoint of an S3-compatible store (MinIO, R2, Ceph, GCS). Empty: AWS S3."
    )
    s3_region: str | None = Field(None, description="Region of the bucket. Empty: boto3's default (`AWS_REGION`...).")
    s3_download: Literal["stream", "redirect"] = Field(
        "stream",
        description="Result downloads: `stream` (the API relays the bytes, Range supported) or `redirect` (302 "
        "to a presigned URL of the object: the bytes bypass the API).",
    )
    s3_presign_seconds: int = Field(300, gt=0, le=604800, description="Life of the presigned URL of a redirect.")
    s3_part_bytes: int = Field(
        16 * 2**20,
        ge=5 * 2**20,
        description="Files from this size go up as multipart uploads of parts this large (S3's minimum is 5 MiB).",
    )
    s3_stale_upload_seconds: float = Field(
        900.0,
        gt=0,
        description="An unfinished multipart upload under the prefix without progress for this long (its writer "
        "died) is aborted by the API's upkeep.",
    )

    # --- scale-out: queue claims, managed Redis -------------------------------------------------------------
    claim_window: int = Field(
        64,
        ge=1,
        description="Queue entries a claim or reservation looks at, from the head: the jobs a worker may batch "
        "together or reserve past. A claim costs this many lookups however long the queue. Keep it at least "
        "busy workers x `max_batch` so reserve-ahead reaches every worker.",
    )
    queue_position_scan: int = Field(
        1000,
        ge=1,
        description="Queue entries searched for a job's exact `queue_position`; further back it is estimated "
        "from the order jobs arrived in (constant time).",
    )
    redis_password_file: Path | None = Field(
        None,
        description="File holding the Redis password (a mounted secret); replaces any password in `redis_url`.",
    )
    redis_tls_ca_file: Path | None = Field(
        None, description="CA certificates that sign the Redis server's, for `rediss://` URLs. Empty: the system's."
    )
    redis_tls_cert_file: Path | None = Field(
        None, description="Client certificate for a Redis that requires mutual TLS (with `redis_tls_key_file`)."
    )
    redis_tls_key_file: Path | None = Field(None, description="Private key of `redis_tls_cert_file`.")

    # --- webhooks -----------------------------------------------------------------------------------------------
    webhook_secret: str | None = Field(
        None,
        description="Standard Webhooks signing secret (`whsec_<base64>`). Without it, jobs with a `webhook_url` "
        "are refused.",
    )
    webhook_max_attempts: int = Field(6, gt=0, description="Deliveries tried per webhook before giving up.")
    webhook_backoff_seconds: float = Field(
        2.0, gt=0, description="Delay before the first retry; doubled after each failure."
    )
    webhook_timeout_seconds: float = Field(10.0, gt=0, description="Time a webhook receiver has to answer.")
    webhook_allow_private: bool = Field(
        False, description="Allow webhook URLs that resolve to loopback, private or link-local addresses."
    )

    # --- inputs by URL, deadlines, webhook events -------------------------------------------------------------
    fetch_allow_private: bool = Field(
        False,
        description="Allow `video_url`/`image_url` (and their redirects) that resolve to loopback, private or "
        "link-local addresses.",
    )
    fetch_max_redirects: int = Field(3, ge=0, description="Redirects followed when fetching a `video_url`/`image_url`.")
    fetch_timeout_seconds: float = Field(
        30.0, gt=0, description="Time a `video_url`/`image_url` has to be fetched completely (else 422 `url-timeout`)."
    )
    max_cancel_after_seconds: float = Field(
        86400.0, gt=0, description="Longest `Cancel-After` deadline a submit may ask for."
    )
    webhook_progress_interval_seconds: float = Field(
        5.0, gt=0, description="At most one `progress` webhook per job this often."
    )

    @field_validator("variants", "api_keys", "cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return _split_list(value)

    @model_validator(mode="after")
    def _s3_needs_a_bucket(self) -> Settings:
        if self.storage == "s3" and not self.s3_bucket:
            raise ValueError("MMAUDIO_STORAGE=s3 needs MMAUDIO_S3_BUCKET")
        return self

    @property
    def redis_address(self) -> str:
        """`redis_url`, or the local redis-server that `serve` starts."""
        return self.redis_url or f"redis://127.0.0.1:{self.redis_port}/0"

    def job_timeout(self, duration: float, num_samples: int = 1) -> float:
        """Seconds a job that generates ``num_samples`` x ``duration`` seconds of audio may run."""
        return self.job_timeout_seconds + self.job_seconds_per_minute * duration * num_samples / 60

    @property
    def enabled_variants(self) -> list[str]:
        return list(dict.fromkeys([self.variant, *self.variants]))


@functools.cache
def get_settings() -> Settings:
    return Settings()


def settings_table() -> str:
    """A Markdown table of every setting: environment variable, default and description."""
    rows = ["| Variable | Default | Description |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, list):
            default = ",".join(default)
        elif isinstance(default, Path) and default.is_relative_to(REPO_ROOT):
            default = default.relative_to(REPO_ROOT)  # shown as the checkout-relative folder it is
        shown = "" if default is None else str(default)
        rows.append(f"| `MMAUDIO_{name.upper()}` | `{shown}` | {field.description} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_table())
