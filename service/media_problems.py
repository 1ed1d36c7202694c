"""Which problem a MediaError is: shared by the API (an upload refused before queueing) and the worker (a job
whose video fails to decode while all its frames are read)."""

from __future__ import annotations

from model import media_errors

MEDIA_PROBLEMS: tuple[tuple[type[media_errors.MediaError], str], ...] = (
    (media_errors.EmptyMediaError, "empty-upload"),
    (media_errors.UnreadableMediaError, "unreadable-media"),
    (media_errors.NoVideoStreamError, "no-video-stream"),
    (media_errors.StillImageError, "still-image"),
    (media_errors.UnsupportedCodecError, "unsupported-codec"),
    (media_errors.TruncatedMediaError, "truncated-media"),
    (media_errors.CorruptMediaError, "corrupt-media"),
    (media_errors.VideoTooShortError, "video-too-short"),
    (media_errors.MediaTooLargeError, "media-limits"),
)


def media_problem(error: media_errors.MediaError) -> str:
    """The problem slug of a MediaError."""
    for error_type, slug in MEDIA_PROBLEMS:
        if isinstance(error, error_type):
            return slug
    return "corrupt-media"
