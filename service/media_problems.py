"""Which problem a MediaError is: shared by the API (an upload refused before queueing) and the worker (a job
whose video fails to decode while all its frames are read)."""

from __future__ import annotations

from model import video

MEDIA_PROBLEMS: tuple[tuple[type[video.MediaError], str], ...] = (
    (video.EmptyMediaError, "empty-upload"),
    (video.UnreadableMediaError, "unreadable-media"),
    (video.NoVideoStreamError, "no-video-stream"),
    (video.UnsupportedCodecError, "unsupported-codec"),
    (video.TruncatedMediaError, "truncated-media"),
    (video.CorruptMediaError, "corrupt-media"),
    (video.VideoTooShortError, "video-too-short"),
    (video.MediaTooLargeError, "media-limits"),
)


def media_problem(error: video.MediaError) -> str:
    """The problem slug of a MediaError."""
    for error_type, slug in MEDIA_PROBLEMS:
        if isinstance(error, error_type):
            return slug
    return "corrupt-media"
