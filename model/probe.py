"""Checking an untrusted upload cheaply before any real work: opening it with bounded effort, naming what is
wrong with it (model.media_errors), and reading what the service reports about it (MediaInfo)."""

from __future__ import annotations

import functools
import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
from PIL import Image, UnidentifiedImageError

from model.media_errors import (
    CorruptMediaError,
    EmptyMediaError,
    MediaTooLargeError,
    NoVideoStreamError,
    StillImageError,
    TruncatedMediaError,
    UnreadableMediaError,
    UnsupportedCodecError,
)


@dataclass(frozen=True)
class ProbeLimits:
    """Bounds on the work one untrusted file can cause before it is accepted."""

    max_width: int = 8192
    max_height: int = 8192
    max_packets_to_first_frame: int = 512  # a sane stream yields a frame within its first GOP
    max_counted_seconds: float = 3600.0  # a stream without a stated duration is counted this far at most


DEFAULT_LIMITS = ProbeLimits()


@dataclass(frozen=True)
class MediaInfo:
    duration_sec: float | None  # None for a still image
    fps: Fraction | None
    width: int  # display orientation (rotation applied)
    height: int
    codec: str
    has_video: bool
    has_audio: bool
    rotation: int  # counter-clockwise degrees the stored frames must turn for display
    timestamped: bool = True  # False for a raw elementary stream: its packets cannot be copied into an mp4


DEFAULT_RAW_FPS = 25.0  # FFmpeg's own assumption for a raw stream that states no rate
MAX_TOP_LEVEL_BOXES = 100_000  # fragmented MP4 has two per fragment; more is not a real file


# Top-level boxes of ISO-BMFF files (ISO 14496-12 and the QuickTime atoms FFmpeg writes and reads).
TOP_LEVEL_BOXES = frozenset(
    b"ftyp moov mdat free skip wide uuid moof mfra styp sidx ssix prft emsg meta pdin udta pnot junk".split()
)


def _truncated_iso_bmff(path: Path) -> bool:
    """Does an MP4/MOV file (first box 'ftyp') declare a top-level box that runs past its end? Bytes after a
    complete movie (its moov and media data) that do not start a known box are trailing junk, not a cut."""
    size = path.stat().st_size
    with path.open("rb") as f:
        offset, first, seen = 0, True, set()
        for _ in range(MAX_TOP_LEVEL_BOXES):
            if offset + 8 > size:
                break
            f.seek(offset)
            header = f.read(16)
            box_size, box_type = int.from_bytes(header[:4], "big"), header[4:8]
            if first and box_type != b"ftyp":
                return False
            first = False
            if box_type not in TOP_LEVEL_BOXES and b"moov" in seen and seen & {b"mdat", b"moof"}:
                return False
            seen.add(box_type)
            if box_size == 1:  # 64-bit size follows the type
                box_size = int.from_bytes(header[8:16], "big")
            if box_size == 0:  # box runs to the end of the file
                return False
            if box_size < 8:
                return False  # not a box structure we understand; let FFmpeg's verdict stand
            offset += box_size
        return offset > size


def _index_past_end(stream: av.stream.Stream, size: int) -> bool:
    """Does the container's sample index point at bytes the file does not have?"""
    entries = stream.index_entries
    return len(entries) > 0 and max(e.pos + e.size for e in entries) > size


@contextmanager
def open_video(path: str | Path) -> Iterator[tuple[av.container.InputContainer, av.video.stream.VideoStream]]:
    """The opened container and its first video stream, or the MediaError that says why not."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise EmptyMediaError(f"{path.name}: the file is empty")
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except av.error.FFmpegError as exc:
        if _truncated_iso_bmff(path):
            raise TruncatedMediaError(f"{path.name}: the file is cut short (incomplete upload?)") from exc
        raise UnreadableMediaError(f"{path.name}: not a readable video or audio file ({exc.strerror})") from exc
    with container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["no streams"]
            raise NoVideoStreamError(f"{path.name}: no video stream (has {', '.join(kinds)})")
        stream = container.streams.video[0]
        if stream.codec_context is None:
            raise UnsupportedCodecError(f"{path.name}: its video codec is not supported (no decoder)")
        if any(_index_past_end(s, size) for s in container.streams) or _truncated_iso_bmff(path):
            raise TruncatedMediaError(f"{path.name}: the file is cut short (incomplete upload?)")
        yield container, stream


def _first_frame(container, stream, limits: ProbeLimits) -> av.VideoFrame:
    try:
        for count, packet in enumerate(container.demux(stream)):
            if count >= limits.max_packets_to_first_frame:
                break
            for frame in packet.decode():
                return frame
    except av.error.FFmpegError as exc:
        raise CorruptMediaError(f"the video does not decode ({exc.strerror})") from exc
    raise CorruptMediaError("the video stream yields no frame")


def _check_size(path: Path, width: int, height: int, limits: ProbeLimits) -> None:
    if width > limits.max_width or height > limits.max_height:
        raise MediaTooLargeError(f"{path.name}: {width}x{height} is larger than {limits.max_width}x{limits.max_height}")


def display_rotation(frame: av.VideoFrame) -> int:
    """Counter-clockwise rotation to display orientation, snapped to a multiple of 90 degrees."""
    angle = frame.rotation
    if not -180 <= angle <= 180:  # a degenerate display matrix (PyAV reports INT_MIN): show as stored
        return 0
    return round(angle / 90) % 4 * 90


def _is_still_image(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> bool:
    """FFmpeg opens PNG, JPEG, WebP... files as one-frame 'videos' through its image demuxers."""
    name = container.format.name
    return name == "image2" or (name.endswith("_pipe") and stream.frames <= 1)


def _counted_duration(path: Path, fps: Fraction | None, limits: ProbeLimits) -> float:
    """Duration of a stream whose container states none (a raw H.264 or HEVC elementary stream): its packets
    counted (demuxed, not decoded) at its frame rate, up to ``limits.max_counted_seconds``. Such streams do
    not seek, so the count reads the file from a fresh open."""
    rate = float(fps) if fps else DEFAULT_RAW_FPS
    frames = 0
    with av.open(str(path), metadata_errors="ignore") as container:
        for packet in container.demux(container.streams.video[0]):
            frames += packet.size > 0
            if frames / rate > limits.max_counted_seconds:
                break
    return frames / rate


def probe_video(path: str | Path, limits: ProbeLimits = DEFAULT_LIMITS) -> MediaInfo:
    """Cheap validation of an upload: opens it, checks its size and decodes one frame.

    Raises a MediaError subclass for empty, unreadable, truncated, audio-only, undecodable,
    corrupt or oversized files and for still images.  Work is bounded by the container probe and ``limits``.
    """
    with open_video(path) as (container, stream):
        if _is_still_image(container, stream):
            raise StillImageError(f"{Path(path).name}: a still image, not a video (send it as the image)")
        width, height = stream.codec_context.width, stream.codec_context.height
        _check_size(Path(path), width, height, limits)
        stream.thread_type = "AUTO"
        frame = _first_frame(container, stream, limits)
        width, height = frame.width, frame.height  # a raw stream's header may not state them
        _check_size(Path(path), width, height, limits)
        rotation = display_rotation(frame)
        if rotation % 180:
            width, height = height, width
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        else:
            duration = _counted_duration(Path(path), stream.guessed_rate, limits)
        return MediaInfo(
            duration_sec=duration,
            fps=stream.guessed_rate,
            width=width,
            height=height,
            codec=stream.codec_context.codec.canonical_name,  # "av1", not the decoder "libdav1d"
            has_video=True,
            has_audio=bool(container.streams.audio),
            rotation=rotation,
            timestamped=frame.pts is not None,
        )


@functools.cache
def mp4_video_codecs() -> frozenset[str]:
    """Video codecs FFmpeg's mp4 muxer can carry, so a stream of one of them can be copied into the result."""
    with av.open(io.BytesIO(), "w", format="mp4") as muxer:
        return frozenset(muxer.supported_codecs)


@contextmanager
def open_image(path: str | Path, limits: ProbeLimits = DEFAULT_LIMITS) -> Iterator[Image.Image]:
    """The image with only its header read and its size checked; decoding it inside the block maps errors the
    same way (one mapping for probing and loading)."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise EmptyMediaError(f"{path.name}: the file is empty")
    try:
        with Image.open(path) as image:
            _check_size(path, *image.size, limits)
            yield image
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise UnreadableMediaError(f"{path.name}: not a readable image ({exc})") from exc
    except OSError as exc:  # PIL's answer to a truncated or damaged image
        raise TruncatedMediaError(f"{path.name}: the image does not decode ({exc})") from exc


def probe_image(path: str | Path, limits: ProbeLimits = DEFAULT_LIMITS) -> MediaInfo:
    """Validation of an uploaded still image: its size from the header, checked before any pixel is decoded,
    then one full decode (a damaged file fails here, not in a worker)."""
    with open_image(path, limits) as image:
        width, height = image.size
        image.load()
        codec = (image.format or "image").lower()
    return MediaInfo(None, None, width, height, codec, has_video=False, has_audio=False, rotation=0)
