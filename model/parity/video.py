"""Parity runner for ``video_frames`` fixtures: our loader on the fixture's video, summarised like the fixture."""

from __future__ import annotations

import torch

from model.parity.harness import Fixture
from model.video import load_video


def _u8_codes(frames: torch.Tensor, index: torch.Tensor, lo: float) -> torch.Tensor:
    """Frames ``index`` back to the uint8 codes they were made from (values lie on the 1/255 grid of [lo, 1])."""
    unit = (frames[index] - lo) / (1 - lo)
    return (unit * 255).round().to(torch.uint8)


def _summary(name: str, frames: torch.Tensor, lo: float) -> dict[str, torch.Tensor]:
    n = frames.shape[0]
    index = torch.tensor([0, n // 2, n - 1])
    return {
        f"num_{name}_frames": torch.tensor(n),
        f"{name}_shape": torch.tensor(frames.shape),
        f"{name}_mean": frames.mean(dim=(2, 3)),
        f"{name}_std": frames.std(dim=(2, 3), correction=0),
        f"{name}_frame_index": index,
        f"{name}_frames_u8": _u8_codes(frames, index, lo),
    }


def run_video_frames(fixture: Fixture) -> dict[str, torch.Tensor]:
    video = load_video(fixture.file(fixture.inputs["video_file"]), float(fixture.inputs["duration_sec"]))
    fps = video.fps
    return {
        "duration_sec": torch.tensor(video.duration_sec, dtype=torch.float64),
        "orig_fps": torch.tensor([fps.numerator, fps.denominator]),  # the Fraction, as exact integers
        **_summary("clip", video.clip_frames, lo=0.0),
        **_summary("sync", video.sync_frames, lo=-1.0),
    }
