"""A tqdm bar fed by job states: the queue position while queued, then sampling steps (window by window when
the job reports them, else the stage's fraction of the job's steps), then the stages after sampling."""

from __future__ import annotations

from typing import Any

from tqdm import tqdm


def step_count(job: dict[str, Any]) -> tuple[int, int]:
    """(steps done, steps in all) of a job state."""
    progress = job.get("progress") or {}
    steps = progress.get("steps")
    if steps:
        windows = progress.get("windows") or 1
        done = ((progress.get("window") or 1) - 1) * steps + (progress.get("step") or 0)
        return done, windows * steps
    total = job["params"]["num_steps"]
    if job["status"] == "succeeded":
        return total, total
    stage = progress.get("stage")
    if stage == "sampling":
        return round((progress.get("fraction") or 0.0) * total), total
    return (total if stage in ("decoding", "encoding", "done") else 0), total


def stage_label(job: dict[str, Any]) -> str:
    if job["status"] == "queued":
        position = job.get("queue_position")
        return f"queued #{position}" if position else "queued"
    if job["status"] != "running":
        return job["status"]
    progress = job.get("progress") or {}
    label = progress.get("stage") or "running"
    if (progress.get("windows") or 1) > 1:
        label += f" {progress['window']}/{progress['windows']}"
    return label


class JobBar:
    def __init__(self, job: dict[str, Any]) -> None:
        self.bar = tqdm(total=step_count(job)[1], unit="step", dynamic_ncols=True)
        self.update(job)

    def update(self, job: dict[str, Any]) -> None:
        done, total = step_count(job)
        self.bar.total = total
        self.bar.n = done
        self.bar.set_description_str(stage_label(job), refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
