"""The function RQ calls for each queued job. Its payload is (job id, attempt): JSON, never pickled data."""

from __future__ import annotations

from service.worker.executor import JobExecutor

_executor: JobExecutor | None = None


def install(executor: JobExecutor) -> None:
    """Bind the process's resident executor (done once by the worker before it takes jobs)."""
    global _executor
    _executor = executor


def run_job(job_id: str, attempt: int) -> None:
    if _executor is None:
        raise RuntimeError("run_job needs a worker started with `python -m service.worker`")
    _executor.run(job_id, attempt)
