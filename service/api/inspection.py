"""Checking an upload before it is queued: is it a usable video or image within the deployment's limits?

A file that fails here is answered with a 4xx and never reaches a worker (service.media_problems maps each
MediaError to its problem, here and in the worker).
"""

from __future__ import annotations

from pathlib import Path

from model import video
from model.sequence import SYNC_FPS, SYNC_SEGMENT
from service.media_problems import media_problem
from service.problems import ProblemError
from service.schemas import InputKind, MediaSummary
from service.settings import Settings

MIN_VIDEO_SECONDS = SYNC_SEGMENT / SYNC_FPS  # one Synchformer window


def inspect_upload(path: Path, kind: InputKind, settings: Settings) -> MediaSummary:
    """Probe an uploaded video or image; raises ProblemError (4xx) when it is unusable or over the limits."""
    try:
        summary = _probe_image(path, settings) if kind == "image" else _probe_video(path, settings)
    except video.MediaError as err:
        raise ProblemError(media_problem(err), str(err)) from err
    return summary


def _probe_video(path: Path, settings: Settings) -> MediaSummary:
    side = settings.max_video_side
    info = video.probe_video(path, video.ProbeLimits(max_width=side, max_height=side))
    if info.duration_sec is not None and info.duration_sec < MIN_VIDEO_SECONDS:
        raise video.VideoTooShortError(
            f"the video lasts {info.duration_sec:.2f} s; at least {MIN_VIDEO_SECONDS:.2f} s is needed"
        )
    if info.duration_sec is not None and info.duration_sec > settings.max_video_seconds:
        raise video.MediaTooLargeError(
            f"the video lasts {info.duration_sec:.1f} s, longer than {settings.max_video_seconds:g} s"
        )
    return MediaSummary(
        duration=info.duration_sec,
        width=info.width,
        height=info.height,
        fps=float(info.fps) if info.fps else None,
        codec=info.codec,
        has_audio=info.has_audio,
    )


def _probe_image(path: Path, settings: Settings) -> MediaSummary:
    from PIL import Image, UnidentifiedImageError

    if path.stat().st_size == 0:
        raise video.EmptyMediaError("the file is empty")
    try:
        with Image.open(path) as image:
            width, height = image.size  # from the header: checked before any pixel is decoded
            if max(width, height) > settings.max_video_side:
                raise video.MediaTooLargeError(f"{width}x{height} is larger than {settings.max_video_side} a side")
            image.load()
            codec = (image.format or "image").lower()
    except (UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise video.UnreadableMediaError(f"not a readable image ({err})") from err
    except OSError as err:  # PIL's answer to a truncated or damaged image
        raise video.TruncatedMediaError(f"the image does not decode ({err})") from err
    return MediaSummary(width=width, height=height, codec=codec)
