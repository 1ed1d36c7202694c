"""Turning a submit request into a queued job: validation, upload checks, idempotency, queue capacity."""

from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from pydantic import ValidationError
from redis import Redis

from model import probe
from service import capacity, keys, queue
from service.api.fetching import fetch_input
from service.api.probing import ProbePool
from service.api.uploads import SubmitBody
from service.jobs import JobRecord, JobStore
from service.outbound import ForbiddenURL, UnresolvableURL, checked_address
from service.problems import ProblemError
from service.schemas import (
    DEFAULT_DURATION,
    NATIVE_SAMPLE_RATES,
    OUTPUT_SAMPLE_RATE,
    WHOLE_VIDEO,
    Duration,
    EffectiveParams,
    InputInfo,
    InputKind,
    JobParams,
    JobStatus,
    MediaSummary,
    ModelInfo,
    Progress,
    ResultFormat,
    WebhookState,
    WeightsInfo,
)
from service.settings import Settings
from service.storage import BlobStore, upload_name

RANDOM_SEED_BOUND = 2**31  # drawn seeds stay easy to read and to type back in
PENDING = "pending"  # idempotency marker of a job still being created
DRAWN_OR_RESOLVED = {"duration", "seed", "variant", "output_format", "sample_rate"}  # effective values the API decides
URL_FIELDS = {"video_url": "video", "image_url": "image"}  # JSON fields naming an input to fetch -> its kind
DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smh]?)")
UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600}


@dataclass(frozen=True)
class Submitted:
    record: JobRecord
    replayed: bool  # True: an earlier request with the same Idempotency-Key made this job


def validation_problem(err: ValidationError) -> ProblemError:
    errors = [
        {"loc": [str(part) for part in error["loc"]], "msg": error["msg"], "type": error["type"]}
        for error in err.errors()
    ]
    return ProblemError(
        "validation-error", "; ".join(f"{'.'.join(e['loc']) or 'body'}: {e['msg']}" for e in errors), errors=errors
    )


def estimate_wait_seconds(redis: Redis, settings: Settings, variant: str) -> int:
    """Time until a full queue of ``variant`` has room again: the jobs over the limit times the interval between
    job starts (capacity.drain), counted as if one worker served the variant when none does now."""
    excess = max(1, queue.depth(redis, variant) - settings.max_queue + 1)
    return max(1, math.ceil(excess * capacity.drain(redis, settings, variant).seconds_per_job))


NOT_INTO_MP4 = "cannot be copied into an mp4 result; ask for output_format flac, wav or m4a (the audio alone)."


def cancel_after_seconds(header: str | None, cap: float) -> float | None:
    """Seconds of a ``Cancel-After`` header: a number of seconds (``90``) or one with a unit (``90s``, ``2m``,
    ``1h``), more than 0 and at most ``cap``; None when absent."""
    if header is None:
        return None
    match = DURATION.fullmatch(header.strip().lower())
    if match is None:
        raise ProblemError("validation-error", "Cancel-After must be seconds (90) or a duration (90s, 2m, 1h).")
    seconds = float(match[1]) * UNIT_SECONDS[match[2]]
    if not 0 < seconds <= cap:
        raise ProblemError("validation-error", f"Cancel-After must be more than 0 and at most {cap:g} seconds.")
    return seconds


def input_kind(body: SubmitBody) -> InputKind:
    """What the job generates from: the uploaded file's field, the URL field's kind, else text."""
    named = [field for field in URL_FIELDS if body.fields.get(field) is not None]
    if body.file is not None and named:
        raise ProblemError("validation-error", f"Send the {body.file.field} either as a file or as {named[0]}.")
    if body.file is not None:
        return cast(InputKind, body.file.field)  # the file fields are named after the input kinds
    return cast(InputKind, URL_FIELDS[named[0]]) if named else "text"


def output_format(params: JobParams, kind: InputKind) -> ResultFormat:
    """The job's result format: the client's, else mp4 for a video and flac otherwise."""
    return params.output_format or ("mp4" if kind == "video" else "flac")


def check_copyable_into_mp4(media: MediaSummary) -> None:
    """An mp4 result copies the upload's video stream: refuse now what the mux would refuse later."""
    if media.codec not in probe.mp4_video_codecs():
        raise ProblemError("unsupported-codec", f"{media.codec} video {NOT_INTO_MP4}")
    if media.timestamped is False:
        raise ProblemError("unsupported-codec", f"A {media.codec} stream without a container {NOT_INTO_MP4}")


def job_duration(params: JobParams, media: MediaSummary | None, max_duration: float) -> tuple[Duration, float]:
    """(requested, sized-for) duration of a job: an omitted duration is the whole video, or the default without
    one; a video shortens the number to its length. A whole video longer than ``max_duration`` is refused: its
    client asked for all of it, so a silent cut would not be what it asked (a number gets the start)."""
    if media is None:
        requested = DEFAULT_DURATION if params.duration is None else params.duration
        assert requested != WHOLE_VIDEO, "JobParams allows the whole video with a video only"
        return requested, requested
    requested = WHOLE_VIDEO if params.duration is None else params.duration
    length = media.duration if media.duration is not None else max_duration
    if requested != WHOLE_VIDEO:
        return requested, min(requested, length)
    if length > max_duration:
        raise ProblemError(
            "media-limits",
            f"The video lasts {length:.1f} s; a job generates at most {max_duration:g} s (MMAUDIO_MAX_DURATION). "
            f"Send a duration of at most {max_duration:g} for the start of the video.",
            limit_seconds=max_duration,
        )
    return WHOLE_VIDEO, length


def webhook_state(params: JobParams, base_url: str) -> WebhookState:
    assert params.webhook_url is not None
    events = params.webhook_events or ["completed"]
    status = "pending" if "completed" in events else None
    return WebhookState(url=params.webhook_url, events=events, status=status, base_url=base_url)


class Submitter:
    def __init__(self, redis: Redis, settings: Settings, jobs: JobStore, store: BlobStore, probes: ProbePool) -> None:
        self.redis = redis
        self.settings = settings
        self.jobs = jobs
        self.store = store
        self.probes = probes

    def check_capacity(self, variant: str) -> None:
        if queue.depth(self.redis, variant) >= self.settings.max_queue:
            wait = estimate_wait_seconds(self.redis, self.settings, variant)
            raise ProblemError(
                "queue-full",
                f"{self.settings.max_queue} jobs are already waiting for {variant}.",
                {"Retry-After": str(wait)},
                retry_after_seconds=wait,
            )

    def submit(
        self,
        owner: str,
        body: SubmitBody,
        idempotency_key: str | None,
        base_url: str,
        folder: Path,
        cancel_after: float | None = None,
    ) -> Submitted:
        """Validate, fetch (a ``video_url``/``image_url``, into ``folder``), probe and queue a job; ``cancel_after``
        seconds from now is its deadline."""
        kind = input_kind(body)
        try:
            params = JobParams.model_validate(body.fields, context={"settings": self.settings, "input_kind": kind})
        except ValidationError as err:
            raise validation_problem(err) from err
        variant = params.variant or self.settings.variant
        if variant not in self.settings.enabled_variants:
            raise ProblemError(
                "variant-unavailable", f"Variants served here: {', '.join(self.settings.enabled_variants)}."
            )
        if params.webhook_url is not None:
            if not self.settings.webhook_secret:
                raise ProblemError("webhooks-disabled", "Set MMAUDIO_WEBHOOK_SECRET to enable webhooks.")
            try:
                checked_address(params.webhook_url, self.settings.webhook_allow_private)
            except (ForbiddenURL, UnresolvableURL) as err:
                raise ProblemError("validation-error", f"webhook_url: {err}") from err
        if params.sample_rate not in (None, NATIVE_SAMPLE_RATES[variant], OUTPUT_SAMPLE_RATE):
            rates = f"{NATIVE_SAMPLE_RATES[variant]} (the variant's own) or {OUTPUT_SAMPLE_RATE}"
            raise ProblemError("validation-error", f"sample_rate: {rates}.")

        url = params.video_url or params.image_url
        if url is not None:
            body.file = fetch_input(url, kind, folder, self.settings)
        input_info = InputInfo(kind=kind)
        media = None
        if body.file is not None:
            media = self.probes.inspect(body.file.path, body.file.field)
            if kind == "video" and output_format(params, kind) == "mp4":
                check_copyable_into_mp4(media)
            input_info = InputInfo(
                kind=kind,
                url=url,
                filename=body.file.filename,
                size=body.file.size,
                sha256=body.file.sha256,
                media=media,
            )
        durations = job_duration(params, media if kind == "video" else None, self.settings.max_duration)

        job_id = str(uuid.uuid4())
        idem_key, fingerprint = None, ""
        if idempotency_key is not None:
            fingerprint = hashlib.sha256(
                json.dumps([params.model_dump(mode="json"), kind, input_info.sha256], sort_keys=True).encode()
            ).hexdigest()
            idem_key = keys.idempotency(owner, hashlib.sha256(idempotency_key.encode()).hexdigest())
            earlier = self._claim_idempotency_key(idem_key, fingerprint, job_id)
            if earlier is not None:
                return Submitted(earlier, replayed=True)

        try:
            self.check_capacity(variant)
            record = self._create(
                job_id, owner, params, durations, variant, input_info, body, base_url, cancel_after
            )
        except BaseException:
            if idem_key is not None:
                self.redis.delete(idem_key)
            raise
        if idem_key is not None:
            self.redis.set(
                idem_key,
                json.dumps({"fingerprint": fingerprint, "job_id": job_id, "state": "created"}),
                ex=self.settings.upload_ttl_seconds + self.settings.result_ttl_seconds,
            )
        return Submitted(record, replayed=False)

    def _claim_idempotency_key(self, idem_key: str, fingerprint: str, job_id: str) -> JobRecord | None:
        """Reserve the key for ``job_id``; returns the earlier job when the same request was already made."""
        marker = json.dumps({"fingerprint": fingerprint, "job_id": job_id, "state": PENDING})
        ttl = self.settings.upload_ttl_seconds + self.settings.result_ttl_seconds
        for _ in range(2):  # a second round after clearing a key whose job has expired
            if self.redis.set(idem_key, marker, nx=True, ex=ttl):
                return None
            raw = self.redis.get(idem_key)
            if raw is None:
                continue
            earlier = json.loads(raw)
            if earlier["fingerprint"] != fingerprint:
                raise ProblemError(
                    "idempotency-key-reused", "This Idempotency-Key was sent with different parameters or file."
                )
            if earlier["state"] == PENDING:
                raise ProblemError("idempotency-in-progress", "Retry in a moment.", {"Retry-After": "1"})
            record = self.jobs.get(earlier["job_id"])
            if record is not None:
                return record
            self.redis.delete(idem_key)
        raise ProblemError("idempotency-in-progress", "Retry in a moment.", {"Retry-After": "1"})

    def _create(
        self,
        job_id: str,
        owner: str,
        params: JobParams,
        durations: tuple[Duration, float],
        variant: str,
        input_info: InputInfo,
        body: SubmitBody,
        base_url: str,
        cancel_after: float | None,
    ) -> JobRecord:
        seed = params.seed if params.seed is not None else secrets.randbelow(RANDOM_SEED_BOUND)
        effective = EffectiveParams(
            **params.model_dump(include=set(EffectiveParams.model_fields) - DRAWN_OR_RESOLVED),
            requested_duration=durations[0],
            duration=durations[1],
            seed=seed,
            variant=variant,
            output_format=output_format(params, input_info.kind),
            sample_rate=params.sample_rate or NATIVE_SAMPLE_RATES[variant],
        )
        created = time.time()
        upload = None
        if body.file is not None:
            upload = upload_name(job_id)
            self.store.put_file(upload, body.file.path, self.settings.upload_ttl_seconds)
        record = JobRecord(
            id=job_id,
            owner=owner,
            status=JobStatus.queued,
            created_at=created,
            deadline=None if cancel_after is None else created + cancel_after,
            params=effective,
            input=input_info,
            model=ModelInfo(
                variant=variant,
                weights=WeightsInfo(kind=self.settings.weights, random_weights=self.settings.weights == "tiny"),
            ),
            upload=upload,
            progress=Progress(stage="queued", fraction=0.0),
            webhook=None if params.webhook_url is None else webhook_state(params, base_url),
        )
        try:
            self.jobs.create(record)
        except BaseException:
            if upload is not None:
                self.store.delete(upload)
            raise
        return record
