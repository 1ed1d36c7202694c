"""Checking an upload before it is queued: is it a usable video or image within the deployment's limits?

A file that fails here is answered with a 4xx and never reaches a worker (service.media_problems maps each
MediaError to its problem, here and in the worker).
"""

from __future__ import annotations

from pathlib import Path

from model import media_errors, probe
from model.sequence import MIN_DURATION
from service.media_problems import media_problem
from service.problems import ProblemError
from service.schemas import InputKind, MediaSummary
from service.settings import Settings


def inspect_upload(path: Path, kind: InputKind, settings: Settings) -> MediaSummary:
    """Probe an uploaded video or image; raises ProblemError (4xx) when it is unusable or over the limits."""
    try:
        summary = _probe_image(path, settings) if kind == "image" else _probe_video(path, settings)
    except media_errors.MediaError as err:
        raise ProblemError(media_problem(err), str(err)) from err
    return summary


def _probe_video(path: Path, settings: Settings) -> MediaSummary:
    side = settings.max_video_side
    info = probe.probe_video(path, probe.ProbeLimits(max_width=side, max_height=side))
    if info.duration_sec is not None and info.duration_sec < MIN_DURATION:
        raise media_errors.VideoTooShortError(
            f"the video lasts {info.duration_sec:.2f} s; at least {MIN_DURATION:.2f} s is needed"
        )
    if info.duration_sec is not None and info.duration_sec > settings.max_video_seconds:
        raise media_errors.MediaTooLargeError(
            f"the video lasts {info.duration_sec:.1f} s, longer than {settings.max_video_seconds:g} s"
        )
    return MediaSummary(
        duration=info.duration_sec,
        width=info.width,
        height=info.height,
        fps=float(info.fps) if info.fps else None,
        codec=info.codec,
        has_audio=info.has_audio,
        timestamped=info.timestamped,
    )


def _probe_image(path: Path, settings: Settings) -> MediaSummary:
    side = settings.max_video_side
    info = probe.probe_image(path, probe.ProbeLimits(max_width=side, max_height=side))
    return MediaSummary(width=info.width, height=info.height, codec=info.codec)
