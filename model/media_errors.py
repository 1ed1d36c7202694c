"""Why an uploaded file cannot be used: each kind of unusable upload has its own type, so the service can map
them to 4xx answers (service.api.inspection) and a worker's failed job to a typed error."""

from __future__ import annotations


class MediaError(ValueError):
    """A file that cannot be used as video input."""


class EmptyMediaError(MediaError):
    pass


class UnreadableMediaError(MediaError):
    """Not a container FFmpeg recognises (not media at all, or cut before its header)."""


class TruncatedMediaError(MediaError):
    pass


class NoVideoStreamError(MediaError):
    pass


class StillImageError(MediaError):
    """A picture where a video was expected (FFmpeg opens images as one-frame videos)."""


class UnsupportedCodecError(MediaError):
    pass


class CorruptMediaError(MediaError):
    """The container opens but its video does not decode to usable frames."""


class MediaTooLargeError(MediaError):
    pass


class VideoTooShortError(MediaError):
    pass
