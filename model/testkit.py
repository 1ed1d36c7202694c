"""Helpers shared by the tests and the benchmarks: real media files written with PyAV, the official frame
loader written out plainly, a free TCP port, an S3 server process (moto, from the dev extra) and a WxH
argument parser.

Every video frame has a known layout so tests can check what a loader did with it:
a smooth gradient background, a red block in the top-left corner (shows orientation),
and a white square that moves with the frame index (makes every frame distinct).
"""

from __future__ import annotations

import functools
import math
import socket
import subprocess
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from time import monotonic, sleep

import av
import numpy as np
import torch

RED = (230, 30, 30)
MARKER_FRACTION = 0.25  # the red block covers this share of the width and of the height


@functools.cache
def _noise(height: int, width: int) -> np.ndarray:
    return np.random.default_rng(0).normal(0, 12, (height, width, 1)).astype(np.float32)


def frame_image(index: int, width: int, height: int, texture: bool = False) -> np.ndarray:
    """(height, width, 3) uint8 frame number ``index`` of the test pattern.

    ``texture`` adds a drifting noise field, which gives camera-like bitrates (benchmarks).
    """
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    image = np.empty((height, width, 3), np.float32)
    image[..., 0] = 40 + 120 * x
    image[..., 1] = 60 + 100 * y
    image[..., 2] = 90 + 60 * (x * y)
    if texture:
        image += np.roll(_noise(height, width), (index * 3, index * 5), axis=(0, 1))
    image = image.clip(0, 255).astype(np.uint8)
    image[: int(height * MARKER_FRACTION), : int(width * MARKER_FRACTION)] = RED
    side = max(4, min(width, height) // 6)
    span_x, span_y = width - side, height - side
    left = (index * 7) % max(span_x, 1)
    top = int(span_y * (0.5 + 0.4 * math.sin(index * 0.37)))
    image[top : top + side, left : left + side] = 250
    return image


def make_video(
    path: Path,
    seconds: float = 1.0,
    fps: int = 25,
    size: tuple[int, int] = (320, 240),
    codec: str = "libx264",
    with_audio: bool = False,
    rotation: int = 0,
    preset: str = "veryfast",
    audio_rate: int = 44100,
    faststart: bool = False,
    texture: bool = False,
    display_matrix: list[int] | None = None,
    first_frame: int = 0,
) -> Path:
    """A video of ``seconds`` at ``fps`` with frames of ``size`` = (width, height) as stored.

    ``rotation`` is written as display-matrix side data (counter-clockwise degrees, as
    ``VideoFrame.rotation`` reads it back); the stored pixels are not rotated.
    libx264's ``preset`` decides GOP structure: "veryfast" uses B-frames, "ultrafast" does not.
    ``faststart`` puts an MP4's index before its media data (as phones and web encoders do).
    ``display_matrix`` writes those 9 raw values instead (e.g. a degenerate all-zero matrix).
    ``first_frame``: the pattern's frame number of the first frame (a lossless codec such as ffv1 then makes
    the same video cut at that frame).
    """
    width, height = size
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"preset": preset, "crf": "20"}
        if rotation:
            stream.set_display_rotation(rotation)
        if display_matrix is not None:
            stream.set_display_matrix(display_matrix)
        audio = container.add_stream("aac", rate=audio_rate, layout="stereo") if with_audio else None
        for index in range(round(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(frame_image(first_frame + index, width, height, texture), format="rgb24")
            frame.pts = index
            frame.time_base = Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
        if audio is not None:
            tone = sine(seconds, audio_rate, channels=2)
            container.mux(audio.encode(audio_frame(tone, audio_rate)))
            container.mux(audio.encode())
    return path


def make_vfr_video(
    path: Path, frame_ms: list[int], size: tuple[int, int] = (160, 96), preset: str = "veryfast"
) -> Path:
    """A variable-frame-rate H.264 video: frame ``i`` lasts ``frame_ms[i]`` milliseconds (timestamps in a
    1/1000 time base, as phones write them)."""
    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(1000 // max(1, min(frame_ms))))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)  # the encoder keeps every pts
        stream.options = {"preset": preset, "crf": "20"}
        pts = 0
        for index, milliseconds in enumerate(frame_ms):
            frame = av.VideoFrame.from_ndarray(frame_image(index, width, height), format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, 1000)
            container.mux(stream.encode(frame))
            pts += milliseconds
        container.mux(stream.encode())
    return path


def video_packets(path: Path) -> list[tuple[float, float, bytes, bool]]:
    """(pts s, dts s, payload, keyframe) of every packet of the first video stream, in decode order."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        tb = stream.time_base
        return [
            (float(p.pts * tb), float(p.dts * tb), bytes(p), p.is_keyframe)
            for p in container.demux(stream)
            if p.size  # not the flush marker
        ]


def audio_length(path: Path) -> tuple[int, float, int]:
    """(samples decoded, seconds the container declares, sample rate) of the first audio stream."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        decoded = sum(frame.samples for frame in container.decode(stream))
        return decoded, float(stream.duration * stream.time_base), stream.rate


def sine(seconds: float, rate: int, channels: int = 1, hz: float = 440.0) -> np.ndarray:
    """(channels, samples) float32 tone at half scale."""
    t = np.arange(round(seconds * rate), dtype=np.float64) / rate
    return np.repeat((0.5 * np.sin(2 * np.pi * hz * t))[None].astype(np.float32), channels, 0)


def audio_frame(samples: np.ndarray, rate: int) -> av.AudioFrame:
    layout = "mono" if samples.shape[0] == 1 else "stereo"
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples), format="fltp", layout=layout)
    frame.sample_rate, frame.pts = rate, 0
    return frame


def make_noise_video(path: Path, seconds: float, size: tuple[int, int], fps: int = 25) -> Path:
    """An H.264 video of random pixels, nearly lossless: about 1.4 bytes per pixel per frame, so tests and
    benchmarks get large files (a result that must go up in parts) from few frames."""
    width, height = size
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "1"}
        for index in range(round(seconds * fps)):
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def make_audio_only(path: Path, seconds: float = 1.0, rate: int = 44100) -> Path:
    """An m4a/mp4 with one AAC stream and no video."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=rate, layout="mono")
        container.mux(stream.encode(audio_frame(sine(seconds, rate), rate)))
        container.mux(stream.encode())
    return path


def make_image(path: Path, size: tuple[int, int] = (320, 240)) -> Path:
    """A still image (format from the suffix: png, jpg, webp) of pattern frame 0."""
    from PIL import Image

    Image.fromarray(frame_image(0, *size)).save(path)
    return path


def make_truncated(path: Path, source: Path, keep: float = 0.5) -> Path:
    """The first ``keep`` share of ``source``'s bytes."""
    data = source.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def make_unknown_codec(path: Path, source: Path) -> Path:
    """``source`` (an H.264 mp4) with its sample-entry fourcc renamed, so no decoder claims it."""
    path.write_bytes(source.read_bytes().replace(b"avc1", b"zzz1").replace(b"avcC", b"zzzC"))
    return path


@dataclass
class OfficialFrames:
    clip: torch.Tensor  # (T, 3, 384, 384) float in [0, 1]
    sync: torch.Tensor  # (T, 3, 224, 224) float in [-1, 1]
    duration_sec: float
    rgb: list[np.ndarray]  # every decoded frame up to the duration, full resolution (the naive path keeps them)
    fps: Fraction


def official_frames(path: Path, duration_sec: float) -> OfficialFrames:
    """The spec's loader written out plainly (the naive path): every frame to full-size RGB, picked per rate
    by frame time, then torchvision v2 on the stacks."""
    from torchvision.transforms import v2

    decoded = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps = stream.guessed_rate
        for frame in container.decode(stream):
            if 0 <= frame.time <= duration_sec:
                decoded.append((frame.time, frame.to_ndarray(format="rgb24")))
    picked = {}
    for rate in (8.0, 25.0):
        picked[rate], next_time = [], 0.0
        for time, rgb in decoded:
            while time >= next_time:
                picked[rate].append(rgb)
                next_time += 1 / rate
    bicubic = v2.InterpolationMode.BICUBIC
    to_float = v2.ToDtype(torch.float32, scale=True)
    clip_tf = v2.Compose([v2.Resize((384, 384), bicubic), to_float])
    sync_tf = v2.Compose([v2.Resize(224, bicubic), v2.CenterCrop(224), to_float, v2.Normalize([0.5] * 3, [0.5] * 3)])
    clip = clip_tf(torch.from_numpy(np.stack(picked[8.0])).permute(0, 3, 1, 2))
    sync = sync_tf(torch.from_numpy(np.stack(picked[25.0])).permute(0, 3, 1, 2))
    duration_sec = min(duration_sec, clip.shape[0] / 8.0, sync.shape[0] / 25.0)
    rgb = [frame for _, frame in decoded]
    return OfficialFrames(clip[: int(8.0 * duration_sec)], sync[: int(25.0 * duration_sec)], duration_sec, rgb, fps)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_s3_server(port: int, log: Path, timeout: float = 60.0) -> subprocess.Popen:
    """moto's S3-compatible server in its own process on 127.0.0.1:``port``, once it accepts connections."""
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process
        except OSError:
            if process.poll() is not None or monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"moto's S3 server did not start on port {port}: {log.read_text()}") from None
            sleep(0.1)


def frame_size(text: str) -> tuple[int, int]:
    """'WIDTHxHEIGHT' (a command-line argument) -> (width, height)."""
    width, height = text.lower().split("x")
    return int(width), int(height)
