"""Running one job on the resident pipeline: claim it, feed it the upload, report progress, store the results.

Each stage (claim, input, generate, encode, finish) is its own method so that a worker can later batch
several claimed jobs into one `generate_batch` call, or prepare the next job's input while the current one
is on the GPU.
"""

from __future__ import annotations

import io
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from redis import Redis
from rq.timeouts import JobTimeoutException

from model.media import mux_video, write_audio
from model.pipeline import Cancelled, GenerationRequest, GenerationResult, Pipeline
from model.video import MediaError
from service import keys
from service.inspection import media_problem
from service.jobs import JobRecord, JobStore
from service.metrics import record_stages
from service.problems import problem_body
from service.schemas import MASTER_FORMAT, JobStatus
from service.storage import BlobStore, result_name

log = logging.getLogger(__name__)

RUNNING = (JobStatus.running,)
JOB_SECONDS_SMOOTHING = 0.2  # weight of the newest job in the moving average behind Retry-After


class DeadlineExceeded(Exception):
    """The job ran past `job_timeout_seconds`."""


class JobLost(Exception):
    """The job is no longer this worker's (declared abandoned meanwhile); stop without writing anything."""


class JobExecutor:
    def __init__(self, redis: Redis, jobs: JobStore, store: BlobStore, pipeline: Pipeline, worker_name: str) -> None:
        self.redis = redis
        self.jobs = jobs
        self.settings = jobs.settings
        self.store = store
        self.pipeline = pipeline
        self.worker_name = worker_name
        self.current_job: str | None = None  # read by the heartbeat thread

    def model_info(self) -> dict[str, Any]:
        return {"variant": self.pipeline.variant, "weights": self.pipeline.weights_info}

    def run(self, job_id: str, attempt: int) -> None:
        record = self._claim(job_id, attempt)
        if record is None:
            return
        self.current_job = job_id
        try:
            self._execute(record, attempt)
        finally:
            self.current_job = None

    def _claim(self, job_id: str, attempt: int) -> JobRecord | None:
        """queued -> running for this attempt; None when the job was canceled or already taken."""
        outcome = self.jobs.update(
            job_id,
            (JobStatus.queued,),
            JobStatus.running,
            at_attempt=attempt - 1,
            attempts=attempt,
            worker=self.worker_name,
            started_at=time.time(),
            model=self.model_info(),
            progress={"stage": "starting", "fraction": 0.0},
        )
        if not outcome.applied:
            log.info("job %s attempt %d not started: it is %s", job_id, attempt, outcome.status)
            return None
        return self.jobs.get(job_id)

    def _execute(self, record: JobRecord, attempt: int) -> None:
        owner = {"by_worker": self.worker_name, "at_attempt": attempt}
        assert record.started_at is not None
        timings: dict[str, Any] = {"queue": record.started_at - record.created_at}
        deadline = time.monotonic() + self.settings.job_timeout_seconds
        try:
            with self._local_input(record, timings) as media:
                result = self.pipeline.generate(
                    self._request(record, media), progress=self._progress_reporter(record.id, attempt, deadline)
                )
                self._report(record.id, attempt, "encoding", 0.0)
                started = time.perf_counter()
                result_info = self._store_results(record, result, media)
                timings["encode"] = time.perf_counter() - started
        except JobLost:
            log.warning("job %s attempt %d was taken from this worker; dropped", record.id, attempt)
            return
        except Cancelled:
            self.jobs.finish(record, RUNNING, JobStatus.canceled, timings=timings, **owner)
            return
        except (DeadlineExceeded, JobTimeoutException):
            detail = f"the job ran longer than {self.settings.job_timeout_seconds:g} s"
            self._fail(record, problem_body("timeout", detail), timings, owner)
            return
        except MediaError as err:
            self._fail(record, problem_body(media_problem(err), str(err)), timings, owner)
            return
        except Exception as err:
            log.exception("job %s failed", record.id)
            self._fail(record, problem_body("generation-failed", f"{type(err).__name__}: {err}"), timings, owner)
            return
        timings["model"] = result.metadata["timings"]
        timings["total"] = time.time() - record.created_at
        outcome = self.jobs.finish(
            record,
            RUNNING,
            JobStatus.succeeded,
            result=result_info,
            timings=timings,
            **owner,
        )
        if outcome.applied:
            self._record_metrics(record.variant, timings)

    def _fail(self, record: JobRecord, error: dict, timings: dict, owner: dict) -> None:
        self.jobs.finish(record, RUNNING, JobStatus.failed, error=error, timings=timings, **owner)

    @contextmanager
    def _local_input(self, record: JobRecord, timings: dict[str, Any]) -> Iterator[Path | None]:
        """The upload as a local file (None for text-only jobs)."""
        if record.upload is None:
            timings["input"] = 0.0
            yield None
            return
        started = time.perf_counter()
        suffix = Path(record.input.get("filename") or "").suffix
        with self.store.local_path(record.upload, suffix) as path:
            timings["input"] = time.perf_counter() - started
            yield path

    def _request(self, record: JobRecord, media: Path | None) -> GenerationRequest:
        params = record.params
        kind = record.input["kind"]
        return GenerationRequest(
            prompt=params["prompt"],
            negative_prompt=params["negative_prompt"],
            duration=params["duration"],
            num_steps=params["num_steps"],
            cfg_strength=params["cfg_strength"],
            seed=params["seed"],
            mask_away_clip=params["mask_away_clip"],
            num_samples=params["num_samples"],
            video=media if kind == "video" else None,
            image=media if kind == "image" else None,
        )

    def _report(self, job_id: str, attempt: int, stage: str, fraction: float) -> bool:
        """Publish progress; returns whether a cancel was requested. Raises JobLost if the job is not ours."""
        outcome = self.jobs.update(
            job_id,
            RUNNING,
            by_worker=self.worker_name,
            at_attempt=attempt,
            event="progress",
            progress={"stage": stage, "fraction": round(fraction, 4)},
        )
        if not outcome.applied:
            raise JobLost(job_id)
        return outcome.cancel_requested

    def _progress_reporter(self, job_id: str, attempt: int, deadline: float) -> Callable[[str, float], None]:
        def report(stage: str, fraction: float) -> None:
            if time.monotonic() > deadline:
                raise DeadlineExceeded(job_id)
            if self._report(job_id, attempt, stage, fraction):
                raise Cancelled(job_id)

        return report

    def _store_results(self, record: JobRecord, result: GenerationResult, media: Path | None) -> dict[str, Any]:
        ttl = self.settings.result_ttl_seconds
        # The requested format, and FLAC: the lossless master that other audio formats are converted from
        # on their first download (the mp4 cannot be: the upload is gone by then).
        formats = list(dict.fromkeys([record.params["output_format"], MASTER_FORMAT]))
        sizes = {}
        for sample in range(result.audio.shape[0]):
            audio = result.audio[sample : sample + 1]
            for fmt in formats:
                name = result_name(record.id, sample, fmt)
                if fmt == "mp4":
                    assert media is not None
                    with tempfile.TemporaryDirectory(prefix="mmaudio-mux-") as folder:
                        muxed = Path(folder) / "out.mp4"
                        mux_video(media, audio, result.sample_rate, muxed, result.duration)
                        sizes[f"{sample}.{fmt}"] = self.store.put_file(name, muxed, ttl)
                else:
                    buffer = io.BytesIO()
                    write_audio(buffer, audio, result.sample_rate, fmt)
                    data = buffer.getvalue()
                    self.store.put_bytes(name, data, ttl)
                    sizes[f"{sample}.{fmt}"] = len(data)
        return {
            "duration": result.duration,
            "sample_rate": result.sample_rate,
            "num_samples": result.audio.shape[0],
            "formats": formats,
            "sizes": sizes,
            "ttl_seconds": ttl,
        }

    def _record_metrics(self, variant: str, timings: dict[str, Any]) -> None:
        model = dict(timings["model"])
        stages = {"queue": timings["queue"], "input": timings["input"], "encode": timings["encode"]}
        stages |= {stage: seconds for stage, seconds in model.items() if stage != "total"}
        stages["model"] = model.get("total", 0.0)
        stages["total"] = timings["total"]
        record_stages(self.redis, stages)
        run_seconds = timings["total"] - timings["queue"]
        previous = self.redis.hget(keys.JOB_SECONDS, variant)
        mean = (
            run_seconds
            if previous is None
            else float(previous) + JOB_SECONDS_SMOOTHING * (run_seconds - float(previous))
        )
        self.redis.hset(keys.JOB_SECONDS, variant, mean)
