"""Long requests in the model alone (no service): the window schedules, their joins, and streamed video memory.

    .venv/bin/python -m bench.long_windows schedules [--seconds 60] [--steps 5] [--variant small_16k]
    .venv/bin/python -m bench.long_windows features [--seconds 600] [--size 320x180] [--fps 25] [--video PATH]

``schedules`` generates a text-to-audio request of ``--seconds`` with the tiny preset under each schedule and
prints seconds (sampling, decoding, total, per window) and three continuity numbers per schedule:
  latent_jump   - at each pin's inner edge (where a window's own latents meet the pinned ones), the step
                  between neighbouring latent frames over the window's median step (1: no jump)
  overlap_corr  - correlation of the two windows' waveforms over an overlap (1: the same audio, where an
                  equal-power crossfade adds up to +3 dB in the middle; 0: unrelated, where it keeps the power)
  join_gain_db  - RMS of the joined audio over the middle half of each overlap against the RMS of the
                  two windows' own audio there (0 dB: no swell or dip at the joins)
``features`` streams a video (made with model.testkit.make_video unless --video) through the encode stage
of a windowed request (decode, CLIP features once, sync per window) and prints seconds and the peak RSS.
Run each measurement in its own process: the peak RSS is the process's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.stages import machine
from model.build import VARIANTS, tiny_pipeline
from model.request import GenerationRequest
from model.sequence import LATENT_DOWNSAMPLE
from model.testkit import frame_size, make_video
from model.windows import SCHEDULES, join_waveforms, overlap_latents


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def continuity(pipe, inputs, latents: list[torch.Tensor], waves: list[torch.Tensor]) -> dict[str, float]:
    windows, per_latent = inputs.windows, pipe.audio.hop * LATENT_DOWNSAMPLE
    joined = join_waveforms(windows, waves, per_latent)[0]
    jumps, correlations, gains = [], [], []
    for left, right in itertools.pairwise(windows):
        own, theirs = overlap_latents(right, left)
        x = latents[right.index][0]
        steps = (x[1:] - x[:-1]).norm(dim=-1)
        jumps.append(float(steps[own.stop - 1] / steps.median()))  # between the last pinned and first free frame
        a = waves[left.index][0, theirs.start * per_latent : theirs.stop * per_latent]
        b = waves[right.index][0, own.start * per_latent : own.stop * per_latent]
        correlations.append(float(torch.corrcoef(torch.stack([a, b]))[0, 1]))
        quarter = a.shape[0] // 4
        start = right.latent_start * per_latent + quarter
        middle = joined[start : start + 2 * quarter]
        alone = torch.cat([a[quarter : 3 * quarter], b[quarter : 3 * quarter]])
        gains.append(float(20 * torch.log10(middle.pow(2).mean().sqrt() / alone.pow(2).mean().sqrt())))
    return {
        "latent_jump": round(statistics.mean(jumps), 3),
        "overlap_corr": round(statistics.mean(correlations), 3),
        "join_gain_db": round(statistics.mean(gains), 2),
    }


def schedules(args: argparse.Namespace) -> dict:
    results = {}
    for schedule in SCHEDULES:
        pipe = tiny_pipeline(args.variant, window_schedule=schedule, window_batch=args.window_batch)
        request = GenerationRequest(prompt="rain on a roof", duration=args.seconds, num_steps=args.steps)
        prepared = pipe.prepare(request)
        start = time.perf_counter()
        inputs = pipe.window_inputs(prepared)
        features = time.perf_counter()
        latents = pipe.sample_windows(prepared.request, inputs)
        sampled = time.perf_counter()
        waves = [pipe.decode(x)[1].float()[:, 0] for x in latents]
        decoded = time.perf_counter()
        count = len(inputs.windows)
        results[schedule] = {
            "windows": count,
            "features_s": round(features - start, 2),
            "sampling_s": round(sampled - features, 2),
            "decoding_s": round(decoded - sampled, 2),
            "total_s": round(decoded - start, 2),
            "sampling_s_per_window": round((sampled - features) / count, 3),
            **continuity(pipe, inputs, latents, waves),
        }
    return results


def features(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        video = args.video
        made = 0.0
        if video is None:
            started = time.perf_counter()
            video = make_video(Path(folder) / "long.mp4", seconds=args.seconds, fps=args.fps, size=args.size)
            made = time.perf_counter() - started
        before = peak_rss_mib()
        pipe = tiny_pipeline(args.variant, frame_path=args.frame_path)
        started = time.perf_counter()
        prepared = pipe.prepare(GenerationRequest(prompt="x", duration=None, video=video))
        prepare_s = time.perf_counter() - started
        inputs = pipe.window_inputs(prepared, timings := {})
        return {
            "video": {"seconds": args.seconds, "size": list(args.size), "fps": args.fps, "make_s": round(made, 1)},
            "duration": inputs.duration,
            "windows": len(inputs.windows),
            "prepare_s": round(prepare_s, 2),
            "encode_s": round(time.perf_counter() - started - prepare_s, 2),
            "stage_s": {k: round(v, 2) for k, v in timings.items()},
            "peak_rss_mib_before_pipeline": round(before),
            "peak_rss_mib": round(peak_rss_mib()),
            "model_res_frames_mib_if_held": round((inputs.duration * (8 * 384 * 384 + 25 * 224 * 224) * 3) / 2**20),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("schedules", "features"))
    parser.add_argument("--variant", choices=VARIANTS, default="small_16k")
    parser.add_argument("--seconds", type=float, default=None, help="default: 60 (schedules), 600 (features)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--window-batch", type=int, default=16)
    parser.add_argument("--video", type=Path)
    parser.add_argument("--size", type=frame_size, default=(320, 180))
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--frame-path", choices=("exact", "fast"), default="exact")
    args = parser.parse_args()
    if args.seconds is None:
        args.seconds = 60.0 if args.what == "schedules" else 600.0
    with torch.inference_mode():
        numbers = schedules(args) if args.what == "schedules" else features(args)
    print(json.dumps({args.what: numbers, "machine": machine("cpu")}, indent=1))


if __name__ == "__main__":
    main()
