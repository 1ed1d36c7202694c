"""Video and still-image input for the model: CLIP frames (8 fps, 384x384) and Synchformer frames (25 fps, 224x224).

The default ("exact") path reproduces the official loader bit for bit: every decoded frame is
timed by ``frame.time``; per output rate a running target time picks the first frame at or
after each tick (duplicating frames of low-fps sources); picked frames go through libswscale's
rgb24 conversion and torch's uint8 anti-aliased bicubic resize (what torchvision v2 runs on
CPU).  Unlike the official loader it stops decoding at the duration, converts only picked
frames, resizes each as soon as it is decoded (no full-resolution copies are kept) and turns
frames to their display orientation first.

The "fast" path is for large frames (smaller ones take the exact path): the decoder skips its
deblocking filter, and libswscale scales straight from YUV to one small RGB image that covers
both model sizes (box filter, no full-size RGB), from which torch resizes to each.  It differs
from the exact path by about one uint8 code on average.

Frames are kept as uint8 (``VideoInputs.clip_u8`` / ``sync_u8``); the float model inputs are
made on first use, or on the GPU with ``clip_input`` / ``sync_input`` (4x fewer bytes to move).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

from model.frame_path import FramePath
from model.media_errors import CorruptMediaError, VideoTooShortError
from model.probe import DEFAULT_LIMITS, ProbeLimits, display_rotation, open_image, open_video
from model.sequence import CLIP_FPS, SYNC_FPS


@dataclass(frozen=True)
class FrameConfig:
    clip_fps: float = float(CLIP_FPS)
    clip_size: int = 384  # squashed to a square, aspect ratio not kept
    sync_fps: float = float(SYNC_FPS)
    sync_size: int = 224  # short side resized to this, then a centre crop
    fast_interpolation: str = "AREA"  # libswscale scaler of the fast path (the cheapest one that stays close)
    fast_decoder_options: tuple[tuple[str, str], ...] = (("skip_loop_filter", "all"),)  # ~20% less H.264 work


def clip_input(frames_u8: torch.Tensor) -> torch.Tensor:
    """uint8 CLIP frames -> float32 in [0, 1], bit for bit as torchvision's ToDtype(scale=True)."""
    return frames_u8.float().mul_(1 / 255)


def sync_input(frames_u8: torch.Tensor) -> torch.Tensor:
    """uint8 sync frames -> float32 in [-1, 1] (ToDtype, then Normalize(mean 0.5, std 0.5))."""
    return clip_input(frames_u8).sub_(0.5).div_(0.5)


@dataclass
class VideoInputs:
    clip_u8: torch.Tensor  # (T_clip, 3, clip_size, clip_size) uint8
    sync_u8: torch.Tensor  # (T_sync, 3, sync_size, sync_size) uint8
    duration_sec: float  # requested duration, shortened to what the frames cover
    fps: Fraction  # the source's guessed frame rate (an image counts as 1 fps)
    width: int  # source size in display orientation
    height: int

    @functools.cached_property
    def clip_frames(self) -> torch.Tensor:
        """(T_clip, 3, clip_size, clip_size) float32 in [0, 1]: the CLIP encoder's input."""
        return clip_input(self.clip_u8)

    @functools.cached_property
    def sync_frames(self) -> torch.Tensor:
        """(T_sync, 3, sync_size, sync_size) float32 in [-1, 1]: the Synchformer's input."""
        return sync_input(self.sync_u8)


# ---------------------------------------------------------------------------------------------
# sampling and resizing


class _RateSampler:
    """The official frame picker for one output rate: how often to repeat a frame at time t."""

    def __init__(self, fps: float):
        self.step = 1 / fps
        self.next_time = 0.0  # accumulated by addition, as the official loop does (float drift included)

    def count(self, time: float) -> int:
        n = 0
        while time >= self.next_time:
            n += 1
            self.next_time += self.step
        return n


def _short_side_size(height: int, width: int, short: int) -> tuple[int, int]:
    """torchvision's Resize(int): short side -> ``short``, long side truncated to an int."""
    if width <= height:
        return int(short * height / width), short
    return short, int(short * width / height)


def _center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    height, width = image.shape[-2:]
    # Python's round (halves to even), as torchvision's CenterCrop computes the offsets
    top, left = round((height - size) / 2), round((width - size) / 2)
    return image[..., top : top + size, left : left + size]


def _resize_u8(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, height, width) uint8 with torch's uint8 anti-aliased bicubic."""
    if image.shape[-2:] == (height, width):
        return image  # torchvision returns the input untouched at equal size
    return F.interpolate(image[None], size=(height, width), mode="bicubic", antialias=True, align_corners=False)[0]


def _chw(rgb: np.ndarray, quarter_turns: int) -> torch.Tensor:
    """(H, W, 3) uint8 turned counter-clockwise -> (3, H', W') view with HWC strides.

    Torch's uint8 resize has a fast kernel for this (channels-last) layout only.
    """
    if quarter_turns:
        rgb = np.ascontiguousarray(np.rot90(rgb, quarter_turns))
    return torch.from_numpy(rgb).permute(2, 0, 1)


def _display_size(frame: av.VideoFrame) -> tuple[int, int]:
    """(height, width) of the frame once turned to display orientation."""
    turned = display_rotation(frame) % 180
    return (frame.width, frame.height) if turned else (frame.height, frame.width)


def _sync_resize(display_size: tuple[int, int], config: FrameConfig) -> tuple[int, int]:
    return _short_side_size(*display_size, config.sync_size)  # centre-cropped afterwards


Scaler = Callable[[int, int], torch.Tensor]  # (height, width) -> (3, height, width) uint8


def _torch_scaler(rgb: torch.Tensor) -> Scaler:
    return lambda height, width: _resize_u8(rgb, height, width)


def _exact_scaler(frame: av.VideoFrame, config: FrameConfig) -> Scaler:
    """Official pixels: full-size rgb24 by libswscale, turned, then torch's uint8 resize."""
    # one libswscale thread: a row-wise conversion, same bits, and no thread pool per frame
    rgb = frame.to_ndarray(format="rgb24", threads=1)
    return _torch_scaler(_chw(rgb, display_rotation(frame) // 90))


def _worth_shrinking(height: int, width: int, config: FrameConfig) -> bool:
    """Is the frame large enough for the fast path?  Smaller ones are cheap, and take the exact one."""
    return min(height, width) > max(config.clip_size, config.sync_size)


def _fast_scaler(frame: av.VideoFrame, config: FrameConfig) -> Scaler:
    """libswscale shrinks YUV straight to an RGB image just covering both model sizes; torch does the rest."""
    if not _worth_shrinking(frame.height, frame.width, config):
        return _exact_scaler(frame, config)
    sync_height, sync_width = _sync_resize(_display_size(frame), config)
    height, width = max(config.clip_size, sync_height), max(config.clip_size, sync_width)
    quarter_turns = display_rotation(frame) // 90
    if quarter_turns % 2:  # libswscale works in stored orientation
        height, width = width, height
    interpolation = config.fast_interpolation
    small = frame.reformat(width=width, height=height, format="rgb24", interpolation=interpolation, threads=1)
    return _torch_scaler(_chw(small.to_ndarray(), quarter_turns))


SCALERS: dict[str, Callable[[av.VideoFrame, FrameConfig], Scaler]] = {"exact": _exact_scaler, "fast": _fast_scaler}


def _clip_image(scale: Scaler, config: FrameConfig) -> torch.Tensor:
    return scale(config.clip_size, config.clip_size)  # squashed: the aspect ratio is not kept


def _sync_image(scale: Scaler, display_size: tuple[int, int], config: FrameConfig) -> torch.Tensor:
    return _center_crop(scale(*_sync_resize(display_size, config)), config.sync_size)


def _frames_until(container, stream, end_sec: float) -> Iterator[tuple[float, av.VideoFrame]]:
    """Decoded frames and their times, 0 <= time <= end_sec; decoding stops at the first later frame. A raw
    elementary stream (no container) carries no timestamps: its frames are timed by their index at the
    stream's frame rate, as FFmpeg itself plays them."""
    rate = stream.guessed_rate
    index = -1
    for packet in container.demux(stream):
        for frame in packet.decode():
            index += 1
            time = frame.time
            if time is None:
                if not rate:
                    raise CorruptMediaError("a video frame has no timestamp and the stream no frame rate")
                time = float(index / rate)
            if time > end_sec:
                return
            if time >= 0:
                yield time, frame


def _video_inputs(
    clip_u8: list[torch.Tensor], sync_u8: list[torch.Tensor], duration_sec: float, fps: Fraction, size: tuple[int, int]
) -> VideoInputs:
    if not clip_u8 or not sync_u8:
        raise VideoTooShortError(f"{duration_sec:g} s of video gives no CLIP or no sync frame")
    return VideoInputs(
        clip_u8=torch.stack(clip_u8),
        sync_u8=torch.stack(sync_u8),
        duration_sec=duration_sec,
        fps=fps,
        height=size[0],
        width=size[1],
    )


class _WindowPickers:
    """Sync frame pickers of windows starting every ``stride`` seconds, each reading ``length`` seconds timed
    from its own start: the frames a request on the video cut at that start would pick, for every tick of the
    window (such a request could end early, at a long frame across its end; a window never does)."""

    def __init__(self, stride: int, length: float, fps: float) -> None:
        self.stride, self.length, self.fps = stride, length, fps
        self.open: dict[int, tuple[_RateSampler, list[torch.Tensor]]] = {}
        self.opened = 0

    def picks(self, time: float) -> tuple[list[tuple[list[torch.Tensor], int]], list[tuple[int, list[torch.Tensor]]]]:
        """(frames list of each window that picks the frame at ``time``, and how often; windows now complete)."""
        while self.opened * self.stride <= time:
            self.open[self.opened] = (_RateSampler(self.fps), [])
            self.opened += 1
        picked, complete = [], []
        for index, (sampler, frames) in list(self.open.items()):
            offset = time - index * self.stride
            if offset > self.length:
                # the first frame past the window's end also stands for the ticks still due before that end (the
                # whole-video picker gives a tick to the first frame at or after it): after a long frame, such as
                # a variable-rate video's pause, the window is still full
                if n := sampler.count(self.length):
                    picked.append((frames, n))
                complete.append((index, frames))
                del self.open[index]
            elif n := sampler.count(offset):
                picked.append((frames, n))
        return picked, complete

    def close(self) -> list[tuple[int, list[torch.Tensor]]]:
        complete, self.open = list(self.open.items()), {}
        return [(index, frames) for index, (_, frames) in complete]


class VideoStream:
    """The CLIP and sync frames of a video's first ``duration_sec`` seconds as ``load_video`` picks them, handed
    out in decode order a few at a time, so that a long video never sits in memory whole.

    Iterating yields (clip frames, sync frames, windows) with lists of (3, H, W) uint8 tensors, at least
    ``chunk`` frames of one kind per item but the last (``chunk`` None: one item with every frame).  With
    ``sync_windows`` = (stride, length), sync frames are not picked for the whole video but for windows
    starting every ``stride`` seconds, each picked from its own start (as a request on the video cut there);
    ``windows`` lists each window, as (index, its sync frames), once it is complete (the stream's end completes
    the rest).  Once iterated: ``clip_count``, ``sync_count``, ``duration_sec`` (shortened as ``load_video``
    does; frames past ``int(fps * duration_sec)`` are not part of the video), ``fps`` and the display size;
    once opened, ``container_sec``: the length the container states (None when it states none), an estimate.
    """

    def __init__(
        self,
        path: str | Path,
        duration_sec: float,
        config: FrameConfig = FrameConfig(),
        frame_path: FramePath = "exact",
        chunk: int | None = None,
        sync_windows: tuple[int, float] | None = None,
    ) -> None:
        if frame_path not in SCALERS:
            raise ValueError(f"frame_path must be one of {sorted(SCALERS)}, not {frame_path!r}")
        self.path, self.requested, self.config, self.frame_path = path, duration_sec, config, frame_path
        self.chunk, self.sync_windows = chunk, sync_windows
        self.clip_count = self.sync_count = 0
        self.fps = Fraction(0)
        self.display_size = (0, 0)
        self.container_sec: float | None = None

    @property
    def duration_sec(self) -> float:
        config = self.config
        return min(self.requested, self.clip_count / config.clip_fps, self.sync_count / config.sync_fps)

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[int, list[torch.Tensor]]]]]:
        config, make_scaler = self.config, SCALERS[self.frame_path]
        clip_sampler, sync_sampler = _RateSampler(config.clip_fps), _RateSampler(config.sync_fps)
        windows = None if self.sync_windows is None else _WindowPickers(*self.sync_windows, config.sync_fps)
        self.clip_count = self.sync_count = 0
        clip_u8: list[torch.Tensor] = []
        sync_u8: list[torch.Tensor] = []
        complete: list[tuple[int, list[torch.Tensor]]] = []
        with open_video(self.path) as (container, stream):
            stream.thread_type = "AUTO"
            context = stream.codec_context
            if self.frame_path == "fast" and _worth_shrinking(context.height, context.width, config):
                stream.codec_context.options = dict(config.fast_decoder_options)
            self.fps = stream.guessed_rate
            if stream.duration is not None and stream.time_base is not None:
                self.container_sec = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                self.container_sec = container.duration / av.time_base
            try:
                for time, frame in _frames_until(container, stream, self.requested):
                    n_clip, n_sync = clip_sampler.count(time), sync_sampler.count(time)
                    self.clip_count, self.sync_count = self.clip_count + n_clip, self.sync_count + n_sync
                    picked: list[tuple[list[torch.Tensor], int]] = []
                    if windows is not None:
                        picked, now_complete = windows.picks(time)
                        complete += now_complete
                        n_sync = 0  # counted for the duration; the windows keep the frames
                    if not (n_clip or n_sync or picked):
                        continue  # never converted: e.g. more than half the frames of a 60 fps source
                    scale, self.display_size = make_scaler(frame, config), _display_size(frame)
                    if n_clip:
                        clip_u8 += [_clip_image(scale, config)] * n_clip
                    if n_sync or picked:
                        image = _sync_image(scale, self.display_size, config)
                        sync_u8 += [image] * n_sync
                        for frames, n in picked:
                            frames += [image] * n
                    if complete or (self.chunk is not None and max(len(clip_u8), len(sync_u8)) >= self.chunk):
                        yield clip_u8, sync_u8, complete
                        clip_u8, sync_u8, complete = [], [], []
            except av.error.FFmpegError as exc:
                raise CorruptMediaError(f"{Path(self.path).name}: the video does not decode ({exc.strerror})") from exc
        yield clip_u8, sync_u8, complete + (windows.close() if windows is not None else [])


def load_video(
    path: str | Path, duration_sec: float, config: FrameConfig = FrameConfig(), frame_path: FramePath = "exact"
) -> VideoInputs:
    """CLIP and sync frames of the first ``duration_sec`` seconds of a video (official semantics).

    The returned ``duration_sec`` is shortened when the frames run out: to ``n_clip / clip_fps``,
    then to ``n_sync / sync_fps``; the frames are then cut to ``int(fps * duration_sec)``.
    ``frame_path`` "fast" trades exactness (a few uint8 codes) for speed, see the module doc.
    """
    stream = VideoStream(path, duration_sec, config, frame_path)
    clip_u8: list[torch.Tensor] = []
    sync_u8: list[torch.Tensor] = []
    for clip, sync, _ in stream:
        clip_u8 += clip
        sync_u8 += sync
    return video_inputs(stream, clip_u8, sync_u8)


def video_inputs(stream: VideoStream, clip_u8: list[torch.Tensor], sync_u8: list[torch.Tensor]) -> VideoInputs:
    """The VideoInputs of an iterated stream from all of its frames."""
    duration_sec, config = stream.duration_sec, stream.config
    clip_u8 = clip_u8[: int(config.clip_fps * duration_sec)]
    sync_u8 = sync_u8[: int(config.sync_fps * duration_sec)]
    return _video_inputs(clip_u8, sync_u8, duration_sec, stream.fps, stream.display_size)


def load_image(
    path: str | Path, duration_sec: float, config: FrameConfig = FrameConfig(), limits: ProbeLimits = DEFAULT_LIMITS
) -> VideoInputs:
    """One CLIP and one sync frame from a still image (image-to-audio); the duration is kept as asked.

    Decoded with PIL like the official loader, turned by its EXIF orientation and converted to RGB
    (palette, grey and alpha images included).  Images beyond ``limits`` are refused before decoding.
    """
    from PIL import ImageOps

    with open_image(path, limits) as image:
        rgb = np.array(ImageOps.exif_transpose(image).convert("RGB"))
    image_u8 = _chw(rgb, 0)
    scale, display_size = _torch_scaler(image_u8), tuple(image_u8.shape[-2:])
    clip_u8, sync_u8 = [_clip_image(scale, config)], [_sync_image(scale, display_size, config)]
    return _video_inputs(clip_u8, sync_u8, duration_sec, Fraction(1), display_size)
