"""Running a claimed batch of jobs on the resident pipeline: their inputs, one shared pass, their results.

The jobs of a batch share the model's pass but end on their own. Each progress report goes to every job
still in it, and its answer decides that job alone: a cancel request or a passed Cancel-After deadline ends it
as canceled, a passed job timeout as failed (`timeout`), a job the reaper took away (or that was deleted) is
dropped; its result, if the pass still makes one, is discarded, and results stored for a job that is no
longer this worker's to end are removed again. The pass itself stops only when no job is left in it. A job
whose input cannot be decoded fails before the pass, alone; when a shared pass fails (out of GPU memory at
that batch size, say), each of its jobs is run again alone, so only a job that fails on its own ends as failed.

The stages run on different threads of the worker: inputs are prepared ahead by the prefetcher (or here
when they were not), the pass runs on the main thread, results are encoded and stored by the finisher while
the next pass runs.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import torchaudio
from redis import Redis
from rq.timeouts import JobTimeoutException, UnixSignalDeathPenalty

from model.media_errors import MediaError
from model.pipeline import Cancelled, GenerationResult, Pipeline, PreparedRequest, ProgressCallback, StepDetail
from model.request import REQUEST_PARAMETERS, GenerationRequest
from service import keys, queue, views
from service.jobs import JobRecord, JobStore, UpdateOutcome, deadline_problem, result_names
from service.media_problems import media_problem
from service.metrics import record_stages
from service.problems import problem_body
from service.results import Results
from service.schemas import JobStatus, ModelInfo, WebhookEvent, WeightsInfo, WindowsInfo
from service.storage import BlobStore
from service.upkeep.webhooks import announce
from service.worker.outages import REDIS_DOWN, BestEffort, persist

log = logging.getLogger(__name__)

T = TypeVar("T")

RUNNING = (JobStatus.running,)
JOB_SECONDS_SMOOTHING = 0.2  # weight of the newest job in the moving average behind Retry-After
HARD_STOP_GRACE_SECONDS = 60  # a batch stuck in one call past its deadlines is interrupted this much later


class JobLost(Exception):
    """The job is no longer this worker's (declared abandoned meanwhile); stop without writing anything."""


@dataclass
class JobInput:
    """A job's input made ready on the CPU: the upload as a local file (kept until the result is muxed) and
    the decoded request."""

    prepared: PreparedRequest
    media: Path | None
    fetch_seconds: float
    ahead: bool  # prepared while the job was still queued, during an earlier pass
    resources: ExitStack

    def close(self) -> None:
        self.resources.close()


@dataclass
class ActiveJob:
    """A claimed job while its batch runs."""

    record: JobRecord
    timeout_seconds: float  # its run time limit, grown with the audio it generates
    deadline: float  # time.monotonic() past which the job fails with `timeout`
    timings: dict[str, Any] = field(default_factory=dict)
    input: JobInput | None = None
    ended: bool = False  # canceled, failed or taken away before its result was stored
    progress_webhook_at: float = -math.inf  # time.monotonic() of its last progress webhook

    @property
    def owned(self) -> tuple[str, int]:
        """(job id, attempt): what this worker owns."""
        return self.record.id, self.record.attempts

    @property
    def timeout_problem(self) -> dict[str, Any]:
        return problem_body("timeout", f"the job ran longer than {self.timeout_seconds:g} s")

    @property
    def prepared(self) -> PreparedRequest:
        assert self.input is not None, "a job without input has ended before the pass"
        return self.input.prepared


def release_cached_memory() -> None:
    """Hand the GPU memory the failed pass left cached back to the allocator before the next try."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def problem_of(err: Exception) -> dict[str, Any]:
    if isinstance(err, MediaError):
        return problem_body(media_problem(err), str(err))
    if isinstance(err, REDIS_DOWN):
        return problem_body("redis-unavailable", f"{type(err).__name__}: {err}")
    return problem_body("generation-failed", f"{type(err).__name__}: {err}")


class JobExecutor:
    def __init__(self, redis: Redis, jobs: JobStore, store: BlobStore, pipeline: Pipeline, worker_name: str) -> None:
        self.redis = redis
        self.jobs = jobs
        self.settings = jobs.settings
        self.store = store
        self.results = Results(store)
        self.pipeline = pipeline
        self.worker_name = worker_name
        self._held: set[str] = set()  # ids of the claimed jobs not finished yet; read by the heartbeat thread
        self._held_lock = threading.Lock()
        self._progress_writes = BestEffort(self.settings.redis_reconnect_max_seconds)  # main thread only

    def model_info(self) -> ModelInfo:
        return ModelInfo(variant=self.pipeline.variant, weights=WeightsInfo(**self.pipeline.weights_info))

    def held_jobs(self) -> list[str]:
        with self._held_lock:
            return sorted(self._held)

    # -- inputs ------------------------------------------------------------------------------------------------

    def prepare_input(self, record: JobRecord, ahead: bool = False) -> JobInput:
        """Fetch the job's upload and decode it into the model's inputs (CPU only; any thread)."""
        resources = ExitStack()
        try:
            started = time.perf_counter()
            media = None
            if record.upload is not None:
                suffix = Path(record.input.filename or "").suffix
                local = self.store.local_path
                media = self._retried(
                    lambda: resources.enter_context(local(record.upload, suffix)), f"fetching job {record.id}'s upload"
                )
            fetched = time.perf_counter() - started
            prepared = self.pipeline.prepare(self._request(record, media))
        except BaseException:
            resources.close()
            raise
        return JobInput(prepared, media, fetched, ahead, resources)

    def _request(self, record: JobRecord, media: Path | None) -> GenerationRequest:
        kind = record.input.kind
        return GenerationRequest(
            **record.params.model_dump(include={item.name for item in REQUEST_PARAMETERS} - {"duration"}),
            duration=record.params.generation_duration,
            video=media if kind == "video" else None,
            image=media if kind == "image" else None,
        )

    # -- a batch -----------------------------------------------------------------------------------------------

    def run(
        self, records: list[JobRecord], ready: Mapping[str, Future[JobInput]]
    ) -> tuple[list[ActiveJob], dict[str, GenerationResult]]:
        """Run a claimed batch: each job's input (prepared ahead in ``ready``, by queue entry, or decoded now),
        then the model's pass over the jobs still live, one per group of equal sequence lengths and steps.
        Returns the batch and the results by job id of the jobs still live at the end.

        Main thread only: a batch stuck in one call past its jobs' deadlines is interrupted by SIGALRM."""
        batch = [self._activate(record) for record in records]
        results: dict[str, GenerationResult] = {}
        hard_stop = math.ceil(max(job.timeout_seconds for job in batch)) + HARD_STOP_GRACE_SECONDS
        try:
            with UnixSignalDeathPenalty(hard_stop, JobTimeoutException):
                for job in batch:
                    if not self._ended_if_overdue(job):  # a deadline passed as it was taken: it does not start
                        self._prepare(job, ready.get(queue.rq_job_id(*job.owned)))
                groups: dict[Any, list[ActiveJob]] = {}
                for job in batch:
                    if not job.ended:
                        groups.setdefault(job.prepared.batch_key, []).append(job)
                for group in groups.values():
                    results |= self._generate_group(group)
        except JobTimeoutException:
            for job in batch:
                if not job.ended and job.record.id not in results:
                    self._end(job, JobStatus.failed, error=job.timeout_problem)
        return batch, results

    def _activate(self, record: JobRecord) -> ActiveJob:
        assert record.started_at is not None
        timeout = record.timeout_seconds(self.settings)
        job = ActiveJob(record, timeout, time.monotonic() + timeout)
        job.timings["queue"] = record.started_at - record.created_at
        with self._held_lock:
            self._held.add(record.id)
        self._announce(record, "started")
        return job

    def _announce(self, record: JobRecord, event: WebhookEvent) -> None:
        """Queue a started/progress webhook of the job, if it asked for that event."""
        if record.webhook is not None and event in record.webhook.events:
            view = views.job_view(record, record.webhook.base_url, None)
            announce(self.redis, record, event, view, self.settings.result_ttl_seconds)

    def _prepare(self, job: ActiveJob, ahead: Future[JobInput] | None) -> None:
        """The job's input, from the prefetcher or decoded now; a job whose input fails ends here, alone."""
        try:
            job.input = self._input(job.record, ahead)
        except Exception as err:
            if not isinstance(err, MediaError):
                log.exception("job %s: its input failed", job.record.id)
            self._end(job, JobStatus.failed, error=problem_of(err))
            return
        job.timings["input"] = job.input.fetch_seconds
        job.timings["prepared_ahead"] = job.input.ahead

    def _input(self, record: JobRecord, ahead: Future[JobInput] | None) -> JobInput:
        if ahead is not None:
            try:
                return ahead.result()
            except REDIS_DOWN as err:  # no fault of the job's: prepared again, now with retries
                log.warning("job %s: Redis unreachable while its input was prepared ahead (%s)", record.id, err)
        return self.prepare_input(record)

    def _generate_group(self, group: list[ActiveJob]) -> dict[str, GenerationResult]:
        try:
            outputs = self.pipeline.generate_prepared([job.prepared for job in group], self._progress(group))
        except Cancelled:
            return {}  # every job of the group has ended
        except JobTimeoutException:
            raise  # the whole batch's, handled in run
        except Exception as err:
            live = [job for job in group if not job.ended]
            if len(live) > 1:
                # Out of memory at this batch size, or one job's input the others should not pay for: each
                # job gets a pass of its own before any of them fails.
                log.exception("batch of %d jobs failed; running each alone", len(live))
                release_cached_memory()
                results: dict[str, GenerationResult] = {}
                for job in live:
                    results |= self._generate_group([job])
                return results
            log.exception("job %s failed", live[0].record.id if live else "-")
            for job in live:
                self._end(job, JobStatus.failed, error=problem_of(err))
            return {}
        return {job.record.id: output for job, output in zip(group, outputs, strict=True) if not job.ended}

    def _progress(self, group: list[ActiveJob]) -> ProgressCallback:
        """The pipeline's progress callback for a group: reports to each live job and ends the ones that were
        canceled, ran out of time or were taken away; stops the pass when none is left."""

        def report(stage: str, fraction: float, detail: StepDetail | None) -> None:
            live = [job for job in group if not job.ended]
            # while Redis is down the pass goes on unreported: no answer, so only the deadlines are checked
            answers = self._progress_writes.call(
                lambda: self._publish_progress(live, stage, fraction, detail), "reporting progress"
            )
            outcomes = answers or [None] * len(live)
            now = time.monotonic()
            for job, outcome in zip(live, outcomes, strict=True):
                if outcome is not None and not outcome.applied:
                    log.warning("job %s attempt %d was taken from this worker; dropped", *job.owned)
                    job.ended = True
                elif outcome is not None and outcome.cancel_requested:
                    self._end(job, JobStatus.canceled)
                elif self._ended_if_overdue(job):
                    continue
                elif now > job.deadline:
                    self._end(job, JobStatus.failed, error=job.timeout_problem)
                else:
                    self._progress_webhook(job, now)
            if all(job.ended for job in group):
                raise Cancelled("no job is left in the batch")

        return report

    def _ended_if_overdue(self, job: ActiveJob) -> bool:
        """Cancel a job of this worker whose Cancel-After deadline has passed; returns whether it did."""
        if not job.record.overdue:
            return False
        self._end(job, JobStatus.canceled, error=deadline_problem(job.record))
        return True

    def _progress_webhook(self, job: ActiveJob, now: float) -> None:
        webhook = job.record.webhook
        if webhook is None or "progress" not in webhook.events:
            return
        if now - job.progress_webhook_at < self.settings.webhook_progress_interval_seconds:
            return
        job.progress_webhook_at = now
        current = self.jobs.get(job.record.id)
        if current is not None:
            self._announce(current, "progress")

    def finish(self, batch: list[ActiveJob], results: Mapping[str, GenerationResult]) -> None:
        """Store each live job's results and end it as succeeded; release every job of the batch."""
        for job in batch:
            try:
                result = results.get(job.record.id)
                if result is not None and not job.ended:
                    self._complete(job, result)
            finally:
                if job.input is not None:
                    job.input.close()
                with self._held_lock:
                    self._held.discard(job.record.id)

    def _complete(self, job: ActiveJob, result: GenerationResult) -> None:
        assert job.input is not None
        if self._ended_if_overdue(job):
            return
        media = job.input.media
        try:
            encoding = self._retried(lambda: self._publish_progress([job], "encoding", 0.0), "reporting progress")
            if not encoding[0].applied:
                raise JobLost(job.record.id)
            started = time.perf_counter()
            audio, rate = result.audio, result.sample_rate
            wanted = job.record.params.sample_rate
            if wanted is not None and wanted != rate:
                audio, rate = torchaudio.functional.resample(audio.float(), rate, wanted), wanted
            result_info = self._retried(
                lambda: self.results.store_job(
                    job.record.id,
                    job.record.params.output_format,
                    audio,
                    rate,
                    result.duration,
                    media,
                    self.settings.result_ttl_seconds,
                    whole_video=job.record.params.generation_duration is None,
                ),
                f"storing job {job.record.id}'s result",
            )
            job.timings["encode"] = time.perf_counter() - started
        except JobLost:
            log.warning("job %s attempt %d was taken from this worker; dropped", *job.owned)
            return
        except Exception as err:
            log.exception("job %s: storing its results failed", job.record.id)
            self._end(job, JobStatus.failed, error=problem_of(err))
            return
        if "windows" in result.metadata:
            windows = result.metadata["windows"]
            result_info.windows = WindowsInfo(
                count=windows["count"], overlap_seconds=windows["overlap"], schedule=windows["schedule"]
            )
        job.timings["model"] = result.metadata["timings"]
        job.timings["batch_size"] = result.metadata["batch_size"]
        job.timings["total"] = time.time() - job.record.created_at
        model = {}
        if "dtype_fallback" in result.metadata:  # the claim recorded the model before the batch ran
            model["model"] = self.model_info().model_copy(update={"dtype_fallback": result.metadata["dtype_fallback"]})
        if self._end(job, JobStatus.succeeded, result=result_info, **model):
            try:
                self._record_metrics(job.record.variant, job.timings)
            except REDIS_DOWN as err:  # the job is done; its share of the metrics is not worth a wait
                log.warning("job %s: metrics not recorded (%s)", job.record.id, err)
        else:  # canceled or deleted while its files were written: they must not outlive that
            current = self.jobs.get(job.record.id)
            if current is None or current.attempts == job.record.attempts:  # a later attempt writes the same names
                self.store.delete(*result_names(job.record.id, result_info.num_samples))

    def _retried(self, call: Callable[[], T], doing: str) -> T:
        """``call()`` retried while Redis is down, for `worker_redis_retry_seconds` at most."""
        return persist(call, doing, self.settings.redis_reconnect_max_seconds, self.settings.worker_redis_retry_seconds)

    def _end(self, job: ActiveJob, status: JobStatus, **fields: Any) -> bool:
        """Move a job of this worker into a terminal status; returns whether it was still ours to end.

        Retried until Redis answers: a job of a live worker must never stay `running`. When a try's reply is
        lost, the next try finds the job in ``status`` already, which counts as ours: the write is fenced by
        worker and attempt, so only ours, the reaper's or a later attempt's end could have set it, and theirs
        settle the job the same way."""
        job.ended = True
        tries = 0

        def end() -> UpdateOutcome:
            nonlocal tries
            tries += 1
            return self.jobs.end(
                job.record.id,
                RUNNING,
                status,
                by_worker=self.worker_name,
                at_attempt=job.record.attempts,
                timings=job.timings,
                **fields,
            )

        max_delay = self.settings.redis_reconnect_max_seconds
        outcome = persist(end, f"ending job {job.record.id}", max_delay)
        ours = outcome.applied or (tries > 1 and outcome.status is status)
        if ours:
            persist(lambda: self.jobs.settle(job.record), f"settling job {job.record.id}", max_delay)
        return ours

    def _publish_progress(
        self, jobs: list[ActiveJob], stage: str, fraction: float, detail: StepDetail | None = None
    ) -> list[UpdateOutcome]:
        """Write and announce the progress of jobs of this worker, in one round trip."""
        progress = {"stage": stage, "fraction": round(fraction, 4)} | (asdict(detail) if detail else {})
        return self.jobs.update_owned(
            [job.owned for job in jobs], RUNNING, self.worker_name, event="progress", progress=progress
        )

    def _record_metrics(self, variant: str, timings: dict[str, Any]) -> None:
        model = dict(timings["model"])
        stages = {"queue": timings["queue"], "input": timings["input"], "encode": timings["encode"]}
        stages |= {stage: seconds for stage, seconds in model.items() if stage != "total"}
        stages["model"] = model.get("total", 0.0)
        stages["total"] = timings["total"]
        record_stages(self.redis, stages)
        # a job's share of its worker's time: what one more queued job costs (Retry-After)
        run_seconds = (timings["total"] - timings["queue"]) / timings["batch_size"]
        previous = self.redis.hget(keys.JOB_SECONDS, variant)
        mean = (
            run_seconds
            if previous is None
            else float(previous) + JOB_SECONDS_SMOOTHING * (run_seconds - float(previous))
        )
        self.redis.hset(keys.JOB_SECONDS, variant, mean)
