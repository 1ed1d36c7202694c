"""A long upload end to end (issue 10): a 10-minute video through the real API, or the pipeline on a GPU.

    .venv/bin/python -m bench.long_video [--minutes 10] [--size 1280x720] [--fps 25 | --vfr] [--steps 25]
        [--duration SECONDS] [--storage redis|filesystem] [--variant large_44k_v2] [--video PATH]
    .venv/bin/python -m bench.long_video --gpu [--minutes 10] [--size 1920x1080] [--dtype bf16]

Service (default): makes the clip (H.264, a cycle of 64 distinct pattern frames, so that encoding is what costs),
starts the whole service with `python -m service` (its own redis-server, one worker, tiny weights by default),
uploads the clip as a multipart submit and follows the job to its end. Prints the seconds from the first byte of
the upload to the finished job (and the job's own queue / input / model / encode timings), the worker's RSS after
warm-up and its peak during the job (VmHWM, reset at the submit), how many windows the job's result reports
(`result.windows`) and the seconds per window, the stored result's sizes and where they live, and checks the
downloaded mp4: its video packets hash equal to the upload's and its AAC declares the generated length.
`--duration` asks for that many seconds instead of the whole video.

`--vfr` makes a variable-frame-rate clip instead. `--mux-only`: just the output side in this process, no model: the
whole clip muxed with `--duration` (default: the clip's length) seconds of noise as AAC, and the FLAC master, as
the worker writes them; seconds, peak RSS growth and sizes.

`--gpu`: no service and no download (random full-size weights, as bench/stages.py builds them): the clip
decoded, generated with `--variant` (large_44k_v2) in `--dtype` on CUDA and muxed whole; seconds per part,
windows, seconds per window, peak GPU memory and RSS. The issue's target: at most 30 s for 10 minutes on one
H200. `--gpu --device cpu --tiny --minutes 0.2 --size 320x180 --steps 1` rehearses it on a CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import platform
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import httpx
import psutil
import torch

from bench.service_load import local_service
from model.media import mux_video, write_audio
from model.pipeline import StepDetail
from model.request import GenerationRequest
from model.testkit import audio_length, frame_image, frame_size

PATTERN_FRAMES = 64  # distinct frames the clip cycles through
VFR_FRAME_MS = [40, 40, 33, 100, 20, 66, 40, 250, 40]  # --vfr: frame durations, 20 to 250 ms (69.9 ms average)
POLL_SECONDS = 0.5


def make_long_clip(path: Path, seconds: float, fps: int, size: tuple[int, int], vfr: bool = False) -> Path:
    """An H.264 mp4 of ``seconds`` at ``fps`` cycling through PATTERN_FRAMES pattern frames (libx264 "veryfast",
    B-frames on). ``vfr``: frames last VFR_FRAME_MS in turn instead (a 1/1000 time base, as phones write)."""
    width, height = size
    pattern = [frame_image(index, width, height, texture=True) for index in range(PATTERN_FRAMES)]
    time_base = Fraction(1, 1000) if vfr else Fraction(1, fps)
    frame_ticks = itertools.cycle(VFR_FRAME_MS if vfr else [1])
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = stream.codec_context.time_base = time_base  # the encoder keeps every pts
        stream.options = {"preset": "veryfast", "crf": "23"}
        pts, end = 0, round(seconds / time_base)
        for index, ticks in enumerate(frame_ticks):
            if pts >= end:
                break
            frame = av.VideoFrame.from_ndarray(pattern[index % PATTERN_FRAMES], format="rgb24")
            frame.pts, frame.time_base = pts, time_base
            container.mux(stream.encode(frame))
            pts += ticks
        container.mux(stream.encode())
    return path


def packets_digest(path: Path, limit: int | None = None) -> tuple[int, str]:
    """(count, SHA-256 over the pts, dts and bytes of the first ``limit`` video packets, all when None, in decode
    order), read as a stream."""
    digest, count = hashlib.sha256(), 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for packet in container.demux(stream):
            if count == limit:
                break
            if packet.size:
                digest.update(f"{packet.pts}/{packet.dts}/".encode())
                digest.update(bytes(packet))
                count += 1
    return count, digest.hexdigest()


def packets_check(result: Path, upload: Path) -> str:
    """Whether the result's video packets are the upload's, all of them or a prefix."""
    count, digest = packets_digest(result)
    total = packets_digest(upload)[0]
    if packets_digest(upload, count) != (count, digest):
        return "video packets DIFFER from the upload's"
    return f"video packets identical to the upload's ({'all' if count == total else 'the first'} {count} of {total})"


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set (the kernel's VmHWM), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc status")


def reset_peak_rss(pid: int) -> float:
    """Start the process's peak resident set afresh from its current one (Linux clear_refs); returns it, MiB."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return peak_rss_mb(pid)


def worker_pid() -> int:
    """The one worker process among this process's descendants (`python -m service.worker`)."""
    workers = [child.pid for child in psutil.Process().children(recursive=True) if "service.worker" in child.cmdline()]
    if len(workers) != 1:
        raise RuntimeError(f"expected one worker process, found {workers}")
    return workers[0]


def machine() -> str:
    return f"{platform.node()} ({os.cpu_count()} CPUs, torch {torch.get_num_threads()} threads), {platform.platform()}"


def mb(size: float) -> str:
    return f"{size / 2**20:.1f} MiB"


def video_seconds(path: Path) -> float:
    """The length its container states for the first video stream."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return float(stream.duration * stream.time_base)


def clip_for(args: argparse.Namespace, folder: Path) -> Path:
    if args.video is not None:
        return args.video
    started = time.perf_counter()
    clip = make_long_clip(folder / "long.mp4", args.minutes * 60, args.fps, args.size, args.vfr)
    rate = f"variable frame rate ({min(VFR_FRAME_MS)}-{max(VFR_FRAME_MS)} ms frames)" if args.vfr else f"{args.fps} fps"
    print(
        f"clip: {args.minutes:g} min {args.size[0]}x{args.size[1]} {rate} H.264, {mb(clip.stat().st_size)}, "
        f"made in {time.perf_counter() - started:.1f} s"
    )
    return clip


# --- through the service -----------------------------------------------------------------------------------------


def follow(client: httpx.Client, job: dict) -> dict:
    """Poll the job to its end."""
    while job["status"] not in ("succeeded", "failed", "canceled"):
        time.sleep(POLL_SECONDS)
        job = client.get(f"/v1/jobs/{job['id']}").json()
    return job


def run_service(args: argparse.Namespace, folder: Path) -> None:
    clip = clip_for(args, folder)
    length = video_seconds(clip)
    os.environ |= {
        "MMAUDIO_STORAGE": args.storage,
        "MMAUDIO_STORAGE_DIR": str(folder / "storage"),
        "MMAUDIO_MAX_UPLOAD_BYTES": str(max(clip.stat().st_size + 2**20, 480 * 2**20)),
        "MMAUDIO_MAX_VIDEO_SECONDS": str(length + 1),
        "MMAUDIO_JOB_SECONDS_PER_MINUTE": "3600",  # a CPU with tiny weights is far slower than a GPU
    }
    service_args = argparse.Namespace(
        variant=args.variant,
        weights=args.weights,
        workers=1,
        max_batch=1,
        jobs=1,
        duration=length + 1,
        steps=args.steps,
    )
    with local_service(service_args, folder) as url, httpx.Client(base_url=url, timeout=600) as client:
        worker = worker_pid()
        rss_before = reset_peak_rss(worker)
        fields = {"prompt": "waves on a pebble beach", "num_steps": str(args.steps), "seed": "1"}
        if args.duration is not None:
            fields["duration"] = str(args.duration)
        started = time.perf_counter()
        with clip.open("rb") as handle:
            response = client.post("/v1/jobs", data=fields, files={"video": (clip.name, handle, "video/mp4")})
        if response.status_code != 202:
            raise SystemExit(f"submit answered {response.status_code}: {response.text}")
        uploaded = time.perf_counter() - started
        job = follow(client, response.json())
        total = time.perf_counter() - started
        rss_after = peak_rss_mb(worker)
        if job["status"] != "succeeded":
            raise SystemExit(f"the job {job['status']}: {job['error']}")
        mp4 = folder / "result.mp4"
        with (
            client.stream("GET", f"/v1/jobs/{job['id']}/result", params={"format": "mp4"}) as download,
            mp4.open("wb") as out,
        ):
            for chunk in download.iter_bytes():
                out.write(chunk)

    timings, model = job["timings"], job["timings"]["model"]
    params, result = job["params"], job["result"]
    print(f"machine: {machine()}")
    print(
        f"job: {args.variant}, {job['model']['weights']['kind']} weights, {args.steps} steps, duration asked "
        f"{params['requested_duration']!r}, sized {params['duration']:g} s, generated {result['duration']:g} s"
    )
    print(
        f"end to end: {total:.1f} s (upload + probe + store {uploaded:.1f} s; queue {timings['queue']:.1f}, "
        f"input {timings['input']:.1f}, model {model['total']:.1f}, encode + store {timings['encode']:.1f})"
    )
    stages = ", ".join(f"{name} {seconds:.1f}" for name, seconds in model.items() if name != "total")
    print(f"model stages (s): {stages}")
    windows = (result["windows"] or {"count": 1})["count"]
    print(
        f"windows: {windows} (the job's result.windows); {model['total'] / windows:.2f} s per window of model time, "
        f"{model.get('sampling', 0.0) / windows:.2f} s of sampling"
    )
    print(f"worker RSS: {rss_before:.0f} MiB after load and warm-up, peak {rss_after:.0f} MiB during the job")
    sizes = ", ".join(f"{file['format']} {mb(file['size'])}" for file in result["files"] if file["size"])
    where = "Redis strings (MMAUDIO_STORAGE=redis)" if args.storage == "redis" else f"files under {folder}/storage"
    print(f"stored result: {sizes}, in {where}")
    decoded, declared, rate = audio_length(mp4)
    samples = round(result["duration"] * rate)
    print(
        f"mp4 check: {packets_check(mp4, clip)}; AAC declares "
        f"{declared:.6f} s ({'exact' if declared == samples / rate else 'NOT exact'}), decodes {decoded} samples "
        f"for {samples}"
    )


# --- the output side alone ---------------------------------------------------------------------------------------


def run_mux_only(args: argparse.Namespace, folder: Path) -> None:
    clip = clip_for(args, folder)
    length = video_seconds(clip)
    seconds = args.duration or length
    rate = 44100
    audio = torch.rand(1, round(seconds * rate), generator=torch.Generator().manual_seed(0)) * 0.2 - 0.1
    base = reset_peak_rss(os.getpid())
    started = time.perf_counter()
    mux_video(clip, audio, rate, folder / "result.mp4", seconds, whole_video=args.duration is None)
    muxed = time.perf_counter()
    write_audio(folder / "result.flac", audio, rate, "flac")
    done = time.perf_counter()
    peak = peak_rss_mb(os.getpid())
    print(f"machine: {machine()}")
    print(
        f"mux of {length:g} s of video with {seconds:g} s of audio: {muxed - started:.1f} s; flac "
        f"{done - muxed:.1f} s; RSS {base:.0f} MiB before, peak {peak:.0f} MiB (the audio tensor is {mb(audio.nbytes)})"
    )
    print(
        f"sizes: upload {mb(clip.stat().st_size)}, mp4 {mb((folder / 'result.mp4').stat().st_size)} "
        f"({packets_check(folder / 'result.mp4', clip)}), flac {mb((folder / 'result.flac').stat().st_size)} "
        "(noise: an upper bound for real audio)"
    )


# --- on a GPU ----------------------------------------------------------------------------------------------------


def run_gpu(args: argparse.Namespace, folder: Path) -> None:
    from bench.stages import architecture, random_pipeline

    clip = clip_for(args, folder)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    pipe = random_pipeline(architecture(args.variant, tiny=args.tiny), args.device, dtype)
    cuda = pipe.device.type == "cuda"
    pipe.generate(GenerationRequest(duration=8.0, num_steps=2))  # warm-up: kernels, allocator, graphs
    windows = 0

    def progress(stage: str, fraction: float, detail: StepDetail | None) -> None:
        nonlocal windows
        windows = max(windows, detail.windows if detail else 0)

    request = GenerationRequest(prompt="surf", duration=args.duration, num_steps=args.steps, video=clip)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    prepared = pipe.prepare(request)
    decoded = time.perf_counter()
    result = pipe.generate_prepared([prepared], progress)[0]
    generated = time.perf_counter()
    mux_video(clip, result.audio[:1], result.sample_rate, folder / "result.mp4", result.duration, args.duration is None)
    write_audio(folder / "result.flac", result.audio[:1], result.sample_rate)
    done = time.perf_counter()
    print(f"machine: {machine()}, {torch.cuda.get_device_name() if cuda else 'no GPU'}")
    print(
        f"{args.variant} {args.dtype}, random {'tiny' if args.tiny else 'full-size'} weights, {args.steps} steps: "
        f"{result.duration:g} s generated in {done - started:.1f} s (decode {decoded - started:.1f}, model "
        f"{generated - decoded:.1f}, mux + flac {done - generated:.1f}); target <= 30 s for 10 minutes"
    )
    windows = windows or 1
    print(f"windows: {windows}, {(generated - decoded) / windows:.3f} s of model time per window")
    gpu_memory = f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, " if cuda else ""
    print(
        f"{gpu_memory}peak RSS {peak_rss_mb(os.getpid()):.0f} MiB; result mp4 "
        f"{mb((folder / 'result.mp4').stat().st_size)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--size", type=frame_size, default=None, help="WxH (default 1280x720; 1920x1080 with --gpu)")
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--duration", type=float, default=None, help="seconds to ask for (default: the whole video)")
    parser.add_argument("--video", type=Path, default=None, help="use this clip instead of making one")
    parser.add_argument("--vfr", action="store_true", help="make a variable-frame-rate clip (frames of 20-250 ms)")
    parser.add_argument("--variant", default="large_44k_v2")
    parser.add_argument("--weights", default="tiny", choices=["tiny", "official"])
    parser.add_argument("--storage", default="redis", choices=["redis", "filesystem"])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--mux-only", action="store_true", help="only the output side, in this process")
    parser.add_argument("--gpu", action="store_true", help="the pipeline on CUDA with random full-size weights")
    parser.add_argument("--device", default="cuda", help="with --gpu: cpu to rehearse (with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="with --gpu: the tiny architecture (a rehearsal)")
    args = parser.parse_args()
    args.size = args.size or ((1920, 1080) if args.gpu else (1280, 720))
    with tempfile.TemporaryDirectory(prefix="mmaudio-long-") as folder:
        run = run_gpu if args.gpu else run_mux_only if args.mux_only else run_service
        run(args, Path(folder))


if __name__ == "__main__":
    main()
