"""Video I/O benchmark: a 1080p clip into the two model inputs plus the result video, naive vs ours.

    .venv/bin/python -m bench.video_io [--clip PATH] [--seconds 8] [--fps 30]

naive: every frame decoded to full-size RGB and kept, sampled and resized with torchvision v2
       on the stacks, then the whole video re-encoded with libx264 at 10 Mbps plus AAC
       (what the official demo does).
ours:  ``load_video`` (exact and fast frame paths) and ``mux_video`` (video packets copied).

All paths run side by side in one process; wall and CPU seconds are printed, with the frames'
agreement (exact path vs naive must be bit-identical) and the fast path's differences.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from model.frame_path import FramePath
from model.media import mux_video
from model.testkit import make_video, official_frames, sine
from model.video import load_video

AUDIO_RATE = 44100
NAIVE_BIT_RATE = 10_000_000
FIXTURE_VIDEOS = sorted((Path(__file__).resolve().parents[1] / "tests" / "reference" / "fixtures").glob("*.mp4"))


@dataclass
class Timing:
    wall: float = 0.0
    cpu: float = 0.0

    def __add__(self, other: Timing) -> Timing:
        return Timing(self.wall + other.wall, self.cpu + other.cpu)


def timed(fn: Callable[[], object]) -> tuple[object, Timing]:
    wall, cpu = time.perf_counter(), time.process_time()  # process time includes FFmpeg's threads
    result = fn()
    return result, Timing(time.perf_counter() - wall, time.process_time() - cpu)


# ---------------------------------------------------------------------------------------------
# the naive path


def naive_reencode(frames: list[np.ndarray], fps: Fraction, audio: torch.Tensor, out_path: Path) -> None:
    with av.open(str(out_path), "w") as container:
        video = container.add_stream("libx264", rate=fps)
        video.bit_rate = NAIVE_BIT_RATE
        video.height, video.width = frames[0].shape[:2]
        video.pix_fmt = "yuv420p"
        audio_stream = container.add_stream("aac", rate=AUDIO_RATE, layout="mono")
        for rgb in frames:
            container.mux(video.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(video.encode())
        samples = av.AudioFrame.from_ndarray(audio.numpy(), format="fltp", layout="mono")
        samples.sample_rate = AUDIO_RATE
        container.mux(audio_stream.encode(samples))
        container.mux(audio_stream.encode())


@dataclass
class Run:
    frames: Timing  # video file -> float model inputs
    write: Timing  # result video written
    peak_rss_mb: float  # of the whole process so far
    clip_frames: torch.Tensor
    sync_frames: torch.Tensor

    @property
    def total(self) -> Timing:
        return self.frames + self.write


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_naive(clip: Path, duration: float, audio: torch.Tensor, out: Path) -> Run:
    official, frames_time = timed(lambda: official_frames(clip, duration))
    _, write_time = timed(lambda: naive_reencode(official.rgb, official.fps, audio, out))
    return Run(frames_time, write_time, peak_rss_mb(), official.clip, official.sync)


def run_ours(clip: Path, duration: float, audio: torch.Tensor, out: Path, frame_path: FramePath) -> Run:
    def load():
        video = load_video(clip, duration, frame_path=frame_path)
        _ = video.clip_frames, video.sync_frames  # the float model inputs, as the naive path makes them
        return video

    video, frames_time = timed(load)
    _, write_time = timed(lambda: mux_video(clip, audio, AUDIO_RATE, out, video.duration_sec))
    return Run(frames_time, write_time, peak_rss_mb(), video.clip_frames, video.sync_frames)


def print_table(runs: dict[str, Run]) -> None:
    naive = runs["naive"].total
    print(
        f"{'path':14s} {'frames wall/cpu s':>17s} {'write wall/cpu s':>17s} {'total wall/cpu s':>17s} "
        f"{'speedup wall/cpu':>17s} {'peak RSS MB':>12s}"
    )
    for name, run in runs.items():
        cells = [f"{t.wall:7.2f} / {t.cpu:6.2f}" for t in (run.frames, run.write, run.total)]
        speedup = f"{naive.wall / run.total.wall:6.1f}x / {naive.cpu / run.total.cpu:5.1f}x"
        print(f"{name:14s} {'  '.join(cells)}  {speedup:>17s} {run.peak_rss_mb:12.0f}")
    print("(peak RSS is the process's so far; the naive path runs last)")


def code_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    d = (a.float() - b.float()).abs()
    return f"max {d.max().item():3.0f}  mean {d.mean().item():.3f}  >8 codes {100 * (d > 8).float().mean().item():.3f}%"


def fast_path_differences(videos: list[Path], duration: float) -> None:
    print("\nfast path vs exact path (uint8 codes)")
    for path in videos:
        exact = load_video(path, duration)
        fast = load_video(path, duration, frame_path="fast")
        assert exact.duration_sec == fast.duration_sec
        print(f"  {path.name:28s} clip: {code_diff(exact.clip_u8, fast.clip_u8)}")
        print(f"  {'':28s} sync: {code_diff(exact.sync_u8, fast.sync_u8)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip", type=Path, help="an existing video to use instead of generating the 1080p clip")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch intra-op threads for every path (default 1: FFmpeg's decoder threads already fill 2 cores, "
        "and torch's OpenMP workers only spin against them)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        clip = args.clip
        if clip is None:
            print(f"generating a 1920x1080 {args.seconds:g} s {args.fps} fps H.264 clip ...", flush=True)
            clip = make_video(work / "clip.mp4", args.seconds, args.fps, (1920, 1080), with_audio=True, texture=True)
        with av.open(str(clip)) as container:
            print(f"clip: {clip.stat().st_size / 1e6:.1f} MB, {container.bit_rate / 1e6:.1f} Mbit/s")
        audio = torch.from_numpy(sine(args.seconds + 0.1, AUDIO_RATE))  # the model's output runs a little long
        print(f"torch threads {torch.get_num_threads()}, {torch.backends.cpu.get_cpu_capability()}\n", flush=True)

        load_video(clip, 1.0)  # warm-up: file cache, thread pools and lazy imports, for every path alike
        runs = {
            f"ours ({path})": run_ours(clip, args.seconds, audio, work / f"{path}.mp4", path)
            for path in ("exact", "fast")
        }
        runs["naive"] = run_naive(clip, args.seconds, audio, work / "naive.mp4")
        print_table(dict(sorted(runs.items(), key=lambda item: item[0] != "naive")))

        exact, naive = runs["ours (exact)"], runs["naive"]
        same = torch.equal(exact.clip_frames, naive.clip_frames) and torch.equal(exact.sync_frames, naive.sync_frames)
        print(f"\nexact path == naive (official) model inputs, bit for bit: {same}")
        fast_path_differences([*FIXTURE_VIDEOS, clip], 2.0)


if __name__ == "__main__":
    main()
