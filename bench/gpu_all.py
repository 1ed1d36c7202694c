"""Every GPU measurement of issue 4 in one run (under 8 minutes on one H100), printed and written as JSON.

    .venv/bin/python -m bench.gpu_all --out gpu_all.json                    # on the GPU machine
    .venv/bin/python -m bench.gpu_all --out /tmp/smoke.json --device cpu --smoke  # code paths, tiny sizes

1. Timings: small_16k and large_44k_v2, bf16, 8 s from a generated mp4, 25 steps, cfg 4.5, random
   full-size weights, batch 1 and batch 8: seconds per stage and peak GPU memory (bench.stages),
   with the official code's numbers in brackets.
2. bf16 against fp32 on identical inputs (the same weights, the frames of the same video, the same
   float32 noise): relative L2 error of the encoder features, the first guided velocity, the sampled
   latents, the mel and the waveform (issue 4: the output within 2e-2 of fp32), and of the waveform
   that the bf16 VAE and vocoder make from the fp32 latents (the decoders' own share).
3. End to end without HTTP: a 1080p 8 s mp4 -> model inputs -> generation -> stream-copy mux, with the
   exact and the fast frame path (issue 4 target for the whole service path: 1.5 s).

--sections and --variants pick a subset (e.g. a short second run).

The JSON is rewritten after every measurement, so a run cut short still leaves what it measured;
measurements that would start after --time-limit seconds are skipped and listed as such.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bench.stages import (
    Measurement,
    architecture,
    as_json,
    batch_requests,
    machine,
    make_clip,
    measure,
    official_reference,
    random_pipeline,
    table,
)
from model.media import mux_video
from model.pipeline import Pipeline, PreparedRequest
from model.request import GenerationRequest
from model.testkit import make_video

BF16_TOLERANCE = 2e-2  # issue 4: relative to fp32
LATENCY_TARGETS = {"large_44k_v2": 0.45, "small_16k": 0.3}  # issue 4: seconds of model time at batch 1


@dataclass(frozen=True)
class Plan:
    variants: tuple[str, ...] = ("large_44k_v2", "small_16k")
    batches: tuple[int, ...] = (1, 8)
    duration: float = 8.0
    steps: int = 25
    cfg: float = 4.5
    warmup: int = 1
    repeats: int = 3
    tiny: bool = False  # the tiny architecture: a quick check of this script's code paths


SMOKE = Plan(batches=(1, 2), duration=1.0, steps=2, warmup=0, repeats=1, tiny=True)


class Record:
    """The results so far, rewritten to ``path`` after every change."""

    def __init__(self, path: Path, **header: Any) -> None:
        self.path = path
        self.data: dict[str, Any] = {
            **header,
            "timings": {},
            "cuda_graphs": {},
            "bf16_vs_fp32": {},
            "decoder_seconds": {},
            "end_to_end": {},
            "skipped": [],
        }
        self.save()

    def add(self, section: str, key: str, value: Any) -> None:
        self.data[section][key] = value
        self.save()

    def skip(self, what: str) -> None:
        print(f"skipped (time limit): {what}", flush=True)
        self.data["skipped"].append(what)
        self.save()

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=2))


# ---------------------------------------------------------------------------------------------
# bf16 against fp32


@contextmanager
def exact_float32() -> Iterator[None]:
    """cuBLAS and cuDNN without TF32 inside: a true float32 reference."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            yield
    finally:
        torch.set_float32_matmul_precision(precision)


def relative_error(actual: Tensor, expected: Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm()).item()


@torch.inference_mode()
def stage_outputs(pipe: Pipeline, prepared: PreparedRequest, noise: Tensor, plan: Plan) -> dict[str, Tensor]:
    features = pipe.encode([prepared])
    velocities: list[Tensor] = []

    def keep_first_velocity(step: int, t: Tensor, x: Tensor, velocity: Tensor) -> None:
        if step == 0:
            velocities.append(velocity)

    latents = pipe.sample(features, noise.to(pipe.dtype), plan.steps, plan.cfg, keep_first_velocity)
    mel, waveform = pipe.decode(latents)
    return {
        "clip features": features.clip,
        "sync features": features.sync,
        "text features": features.text,
        "first velocity": velocities[0],
        "latents": latents,
        "mel": mel,
        "waveform": waveform,
    }


def bf16_against_fp32(bf16: Pipeline, fp32: Pipeline, video: Path, plan: Plan) -> dict[str, float]:
    """Relative L2 error of each stage's bf16 output against fp32 (pipelines with the same weights), same inputs."""
    request = batch_requests(1, plan.duration, plan.steps, plan.cfg, video, "precision")[0]
    prepared = fp32.prepare(request)
    noise = fp32.initial_noise([prepared])  # float32, given to both
    with exact_float32():
        expected = stage_outputs(fp32, prepared, noise, plan)
    actual = stage_outputs(bf16, prepared, noise, plan)
    errors = {key: relative_error(actual[key], expected[key]) for key in expected}
    # the decoders' own share: bf16 VAE and vocoder on the fp32 latents
    with torch.inference_mode():
        _, waveform = bf16.decode(expected["latents"].to(bf16.dtype))
    errors["waveform from fp32 latents"] = relative_error(waveform, expected["waveform"])
    # the product option: bf16 encoders and flow, float32 VAE and vocoder
    with torch.inference_mode():
        _, waveform = fp32.decode(actual["latents"].float())
    errors["waveform, fp32 decoders"] = relative_error(waveform, expected["waveform"])
    return errors


@torch.inference_mode()
def decoder_seconds(bf16: Pipeline, fp32: Pipeline, latent_len: int, batches: tuple[int, ...]) -> dict[str, float]:
    """VAE + vocoder seconds in each dtype (float32 with cuDNN's default TF32 convolutions)."""
    seconds = {}
    for label, pipe in (("bf16", bf16), ("fp32", fp32)):
        for batch in batches:
            latents = torch.randn(batch, latent_len, pipe.audio.latent_dim, device=pipe.device, dtype=pipe.dtype)
            pipe.decode(latents)
            torch.cuda.synchronize()
            start = time.perf_counter()
            pipe.decode(latents)
            torch.cuda.synchronize()
            seconds[f"{label} b{batch}"] = time.perf_counter() - start
    return seconds


# ---------------------------------------------------------------------------------------------
# CUDA graphs against eager sampling


@torch.inference_mode()
def graphs_against_eager(pipe: Pipeline, video: Path, plan: Plan) -> dict[str, float]:
    """Sampling seconds with and without the captured step (same inputs), and how far apart the latents are."""
    request = batch_requests(1, plan.duration, plan.steps, plan.cfg, video, "graphs")[0]
    prepared = pipe.prepare(request)
    features = pipe.encode([prepared])
    noise = pipe.initial_noise([prepared])
    graphed_sampler, results = pipe.graphed_sampler, {}
    for label, sampler in (("graphed", graphed_sampler), ("eager", None)):
        pipe.graphed_sampler = sampler
        pipe.sample(features, noise, plan.steps, plan.cfg)  # capture / warm up
        torch.cuda.synchronize()
        start = time.perf_counter()
        latents = pipe.sample(features, noise, plan.steps, plan.cfg)
        torch.cuda.synchronize()
        results[label] = (time.perf_counter() - start, latents.float())
    pipe.graphed_sampler = graphed_sampler
    return {
        "graphed_sampling_s": results["graphed"][0],
        "eager_sampling_s": results["eager"][0],
        "relative_l2_difference": relative_error(results["graphed"][1], results["eager"][1]),
    }


# ---------------------------------------------------------------------------------------------
# an upload's path, HTTP aside: 1080p mp4 -> model inputs -> generation -> muxed mp4


@torch.inference_mode()
def end_to_end(pipe: Pipeline, folder: Path, plan: Plan) -> dict[str, dict[str, float]]:
    """Median seconds of decode, model and mux for one clip, with the exact and the fast frame path."""
    size = (320, 240) if plan.tiny else (1920, 1080)
    video = make_video(folder / "upload.mp4", plan.duration + 1, 30, size, texture=True)
    request = GenerationRequest(
        prompt="surf", duration=plan.duration, num_steps=plan.steps, cfg_strength=plan.cfg, video=video
    )
    results = {}
    for frame_path in ("exact", "fast"):
        pipe.frame_path = frame_path
        runs = []
        for _ in range(plan.warmup + plan.repeats):
            start = time.perf_counter()
            prepared = pipe.prepare(request)
            decoded = time.perf_counter()
            result = pipe.generate_prepared([prepared])[0]
            generated = time.perf_counter()
            mux_video(video, result.audio[:1], result.sample_rate, folder / "result.mp4", result.duration)
            done = time.perf_counter()
            runs.append({"decode": decoded - start, "model": generated - decoded, "mux": done - generated})
        runs = runs[plan.warmup :]
        median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        results[frame_path] = {**median, "total": sum(median.values()), "size": list(size)}
    pipe.frame_path = "exact"
    return results


# ---------------------------------------------------------------------------------------------


@dataclass
class Column:
    variant: str
    measurement: Measurement


def print_summary(columns: dict[str, Column], precision: dict[str, dict[str, float]], plan: Plan) -> None:
    if columns:
        official = None
        if not plan.tiny:
            official = {name: official_reference(c.variant, c.measurement.batch) for name, c in columns.items()}
            print("\n(in brackets: the official code on an H100, issue 4)")
        print(f"seconds, median of {plan.repeats}")
        print(table({name: c.measurement for name, c in columns.items()}, official))
        for name, c in columns.items():
            target = LATENCY_TARGETS.get(c.variant)
            if c.measurement.batch == 1 and target and not plan.tiny:
                verdict = "met" if c.measurement.model <= target else "NOT met"
                print(f"{name}: model {c.measurement.model:.3f} s, target <= {target} s {verdict}")
    for variant, errors in precision.items():
        print(f"\nbf16 vs fp32, {variant}, relative L2 error (target: output within {BF16_TOLERANCE:g})")
        for stage, error in errors.items():
            print(f"  {stage:26s} {error:.2e}")


SECTIONS = ("timings", "graphs", "precision", "e2e")


def run(plan: Plan, device: str, out: Path, time_limit: float, sections: tuple[str, ...] = SECTIONS) -> None:
    start = time.perf_counter()
    record = Record(out, machine=machine(device), plan=asdict(plan), device=device, time_limit_s=time_limit)
    columns: dict[str, Column] = {}
    precision: dict[str, dict[str, float]] = {}

    def time_left(what: str) -> bool:
        if time.perf_counter() - start < time_limit:
            print(f"[{time.perf_counter() - start:6.1f} s] {what}", flush=True)
            return True
        record.skip(what)
        return False

    with tempfile.TemporaryDirectory() as tmp:
        video = make_clip(Path(tmp), plan.duration)
        for variant in plan.variants:
            arch = architecture(variant, plan.tiny)
            if not time_left(f"{variant}: building the bf16 pipeline"):
                continue
            pipe = random_pipeline(arch, device, torch.bfloat16)
            for batch in plan.batches if "timings" in sections else ():
                name = f"{variant} b{batch}"
                if not time_left(f"{name}: timings"):
                    continue
                measurement = measure(
                    pipe,
                    lambda tag, b=batch: batch_requests(b, plan.duration, plan.steps, plan.cfg, video, tag),
                    plan.warmup,
                    plan.repeats,
                )
                columns[name] = Column(variant, measurement)
                official = None if plan.tiny else official_reference(variant, batch)
                record.add("timings", name, {**as_json(measurement), "official_h100": official})
            graphs = "graphs" in sections and device.startswith("cuda") and pipe.graphed_sampler is not None
            if graphs and time_left(f"{variant}: graphs"):
                try:
                    record.add("cuda_graphs", variant, graphs_against_eager(pipe, video, plan))
                except Exception as exc:  # report it and go on: the other numbers still count
                    record.add("cuda_graphs", variant, {"error": repr(exc)})
                print(f"cuda graphs: {record.data['cuda_graphs'][variant]}", flush=True)
            if "e2e" in sections and time_left(f"{variant}: end to end"):
                record.add("end_to_end", variant, end_to_end(pipe, Path(tmp), plan))
                print(f"end to end: {record.data['end_to_end'][variant]}", flush=True)
            if "precision" in sections and time_left(f"{variant}: bf16 vs fp32"):
                reference = random_pipeline(arch, device, torch.float32)  # the same seed: the same weights
                precision[variant] = bf16_against_fp32(pipe, reference, video, plan)
                record.add("bf16_vs_fp32", variant, precision[variant])
                if device.startswith("cuda"):
                    probe = batch_requests(1, plan.duration, plan.steps, plan.cfg, video, "decoders")[0]
                    latent_len = pipe.prepare(probe).lengths.latent
                    record.add("decoder_seconds", variant, decoder_seconds(pipe, reference, latent_len, plan.batches))
                    print(f"decoder seconds: {record.data['decoder_seconds'][variant]}", flush=True)
                del reference
            del pipe
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    record.data["wall_s"] = time.perf_counter() - start
    record.save()
    print_summary(columns, precision, plan)
    print(f"\n{json.dumps(record.data['machine'])}\nwritten {out} after {record.data['wall_s']:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the results")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 s, 2 steps, batch 1 and 2")
    parser.add_argument("--time-limit", type=float, default=420.0, help="start no measurement after this (s)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--variants", default=",".join(Plan.variants), help="comma-separated variants")
    args = parser.parse_args()
    plan = SMOKE if args.smoke else Plan()
    plan = replace(plan, variants=tuple(args.variants.split(",")))
    run(plan, args.device, args.out, args.time_limit, tuple(args.sections.split(",")))


if __name__ == "__main__":
    main()
