"""Every GPU measurement of issue 13 in one run (one `device` call under 9 minutes on an H200), written as JSON.

    python3 -m bench.gpu_all --out $OUT/gpu_all.json                                # on the GPU machine
    python -m bench.gpu_all --out bench/results/cpu_rehearsal.json --tiny --device cpu   # a rehearsal

large_44k_v2, 8 s from a generated mp4, 25 steps, cfg 4.5, random full-size weights (``--tiny``: the tiny
architecture, 1 s, 2 steps).  Sections, in this order (``--sections`` picks some), each in its own try:

  ceilings   bf16 matmul TFLOP/s and device copy GB/s (read + written): the roofs the rest is held against
  baseline   bf16, eager modules, CUDA-graph sampling: seconds per stage at batch 1 and 8, peak memory
  profile    one eager guided flow step under torch.profiler: device time and kernel count by kernel class
  forms      each CPU-verified change on and off: complex vs real RoPE and split vs merged SwiGLU (flow
             sampling seconds), convolution vs sliced vs compiled-sliced vocoder activations (vocoder seconds)
  cudnn      VAE + vocoder seconds with cudnn.benchmark off and on
  precision  fp32 (no TF32) against bf16 and fp16 on the same weights and inputs: relative L2 error and
             non-finite count per stage; whether fp16 generation needed its bf16 rerun
  e2e        a 1080p 8 s mp4 -> model inputs -> generation -> muxed mp4 (exact and fast frame paths), and
             bench/long_video.py --gpu (a 10-minute 1080p clip; on a CPU its 12 s rehearsal)
  compiled   the pipeline with compile_modules (torch.compile default mode): first-call (compile) seconds,
             then batch 1 and 8 as in baseline, and how far its latents are from eager ones

The JSON is rewritten after every item, so a run cut short keeps what it measured; an item that would start
after --time-limit seconds is skipped and listed under ``skipped``, an item that raises is recorded as an error.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import model.flow
from bench.stages import (
    architecture,
    as_json,
    batch_requests,
    machine,
    make_clip,
    measure,
    official_reference,
    random_pipeline,
)
from model.flow import SwiGLU
from model.graphs import GraphedEulerSampler
from model.media import mux_video
from model.pipeline import Pipeline, PreparedRequest
from model.request import GenerationRequest
from model.testkit import make_video
from model.vocoder import AntiAliasedSnakeBeta, sliced_anti_aliased_snake

TARGETS = {  # issue 13, one H200, large_44k_v2, 8 s, 25 steps
    "batch1_model_s": 0.30,
    "clips_per_second": 5.0,
    "waveform_relative_to_fp32": 2e-2,
    "end_to_end_s": 1.2,
    "peak_gpu_gb_b8": 9.4,
}
SECTIONS = ("ceilings", "baseline", "profile", "forms", "cudnn", "precision", "e2e", "compiled")


@dataclass(frozen=True)
class Plan:
    variant: str = "large_44k_v2"
    batches: tuple[int, ...] = (1, 8)
    duration: float = 8.0
    steps: int = 25
    cfg: float = 4.5
    warmup: int = 1
    repeats: int = 3
    tiny: bool = False


TINY = Plan(batches=(1, 2), duration=1.0, steps=2, warmup=0, repeats=1, tiny=True)


class Record:
    """The results so far, rewritten to ``path`` after every item."""

    def __init__(self, path: Path, time_limit: float, **header: Any) -> None:
        self.path, self.time_limit, self.start = path, time_limit, time.perf_counter()
        self.data: dict[str, Any] = {**header, **{s: {} for s in SECTIONS}, "skipped": [], "errors": {}}
        self.save()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def item(self, section: str, key: str, measure_it: Callable[[], Any]) -> Any:
        """Measure one item unless time is up; keep going when it raises."""
        name = f"{section}/{key}"
        if self.elapsed() > self.time_limit:
            print(f"skipped (time limit): {name}", flush=True)
            self.data["skipped"].append(name)
            self.save()
            return None
        print(f"[{self.elapsed():6.1f} s] {name}", flush=True)
        started = time.perf_counter()
        try:
            value = measure_it()
        except Exception as exc:  # report it and go on: the other items still count
            traceback.print_exc()
            self.data["errors"][name] = repr(exc)
            value = None
        else:
            self.data[section][key] = value
            print(f"    {json.dumps(value, default=str)[:400]}", flush=True)
        self.data.setdefault("item_seconds", {})[name] = round(time.perf_counter() - started, 2)
        self.save()
        return value

    def save(self) -> None:
        self.data["wall_s"] = round(self.elapsed(), 1)
        self.path.write_text(json.dumps(self.data, indent=2, default=str))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(run: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def relative_error(actual: Tensor, expected: Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm()).item()


# ---------------------------------------------------------------------------------------------
# ceilings


@torch.inference_mode()
def ceilings(device: torch.device, tiny: bool) -> dict[str, float]:
    n = 256 if tiny else 8192  # bf16 matmuls are emulated (slow) on CPUs without AMX
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    matmul = median_seconds(lambda: a @ b, device, repeats=5 if tiny else 20, warmup=2)
    source = torch.randn((1 << 22) if tiny else (1 << 30), device=device)  # 16 MiB / 4 GiB of float32
    target = torch.empty_like(source)
    copy = median_seconds(lambda: target.copy_(source), device, repeats=5 if tiny else 20, warmup=2)
    return {
        "bf16_matmul_tflops": 2 * n**3 / matmul / 1e12,
        "matmul_size": n,
        "copy_gb_per_s": 2 * source.numel() * 4 / copy / 1e9,
        "copy_bytes": source.numel() * 4,
    }


# ---------------------------------------------------------------------------------------------
# baseline and compiled timings


def timings(pipe: Pipeline, video: Path, plan: Plan, batch: int) -> dict[str, Any]:
    measurement = measure(
        pipe,
        lambda tag: batch_requests(batch, plan.duration, plan.steps, plan.cfg, video, tag),
        plan.warmup,
        plan.repeats,
    )
    official = None if plan.tiny else official_reference(plan.variant, batch)
    return {**as_json(measurement), "official_h100": official}


@torch.inference_mode()
def sampled_latents(pipe: Pipeline, prepared: PreparedRequest, noise: Tensor, plan: Plan) -> Tensor:
    return pipe.sample(pipe.encode([prepared]), noise.to(pipe.dtype), plan.steps, plan.cfg).float()


def first_call(pipe: Pipeline, video: Path, plan: Plan) -> dict[str, float]:
    """Seconds of the first generation of each batch size (the compilations) and of the one after it."""
    seconds = {}
    for batch in plan.batches:
        requests = batch_requests(batch, plan.duration, plan.steps, plan.cfg, video, "first")
        for label in ("first", "second"):
            synchronize(pipe.device)
            start = time.perf_counter()
            pipe.generate_batch(requests)
            synchronize(pipe.device)
            seconds[f"b{batch} {label}"] = time.perf_counter() - start
    return seconds


# ---------------------------------------------------------------------------------------------
# profile of one step


KERNEL_CLASSES = (  # first match wins; names of cuBLAS/CUTLASS/cuDNN/flash/inductor/ATen kernels
    ("gemm", ("gemm", "cutlass", "xmma", "sm90_", "cublas", "matmul", "mm_")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "efficient")),
    ("convolution", ("conv", "cudnn", "implicit", "winograd")),
    ("normalization", ("norm", "welford", "rms")),
    ("copy / layout", ("copy", "memcpy", "memset", "cat", "transpose", "permute", "contiguous")),
    ("elementwise / reduction", ("elementwise", "vectorized", "reduce", "triton", "unrolled", "silu", "mul", "add")),
)


def kernel_class(name: str) -> str:
    lowered = name.lower()
    return next((label for label, keys in KERNEL_CLASSES if any(k in lowered for k in keys)), "other")


@torch.inference_mode()
def profile_step(pipe: Pipeline, video: Path, plan: Plan) -> dict[str, Any]:
    """Device time (ms) and kernel count per class of one eager guided step at batch 1."""
    from torch.profiler import ProfilerActivity, profile

    request = batch_requests(1, plan.duration, plan.steps, plan.cfg, video, "profile")[0]
    prepared = pipe.prepare(request)
    cond, uncond = pipe.conditions(pipe.encode([prepared]), prepared.lengths.latent)
    x = pipe.initial_noise([prepared])
    t = torch.tensor(0.5)

    def step() -> Tensor:
        return pipe.flow.guided_flow(t, x, cond, uncond, plan.cfg)

    for _ in range(2):
        step()
    synchronize(pipe.device)
    cuda = pipe.device.type == "cuda"
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        step()
        synchronize(pipe.device)
    classes: dict[str, dict[str, float]] = {}
    top: list[tuple[float, str]] = []
    for event in prof.key_averages():
        device_us = event.device_time_total if cuda else event.self_cpu_time_total
        if device_us <= 0 or (cuda and event.device_type.name != "CUDA"):
            continue
        entry = classes.setdefault(kernel_class(event.key), {"ms": 0.0, "kernels": 0})
        entry["ms"] += device_us / 1e3
        entry["kernels"] += event.count
        top.append((device_us / 1e3, event.key[:90]))
    total = sum(c["ms"] for c in classes.values())
    step_s = median_seconds(step, pipe.device, repeats=3)
    return {
        "by_class": {
            k: {**v, "share": v["ms"] / total} for k, v in sorted(classes.items(), key=lambda kv: -kv[1]["ms"])
        },
        "kernels_per_step": sum(c["kernels"] for c in classes.values()),
        "device_ms_per_step": total,
        "eager_step_wall_ms": step_s * 1e3,
        "top_kernels_ms": sorted(top, reverse=True)[:12],
        "measured": "CUDA kernels" if cuda else "CPU operators (rehearsal)",
    }


# ---------------------------------------------------------------------------------------------
# each change on and off


def complex_rope(x: Tensor, rope: Tensor) -> Tensor:
    """The previous RoPE: one complex64 product (the 'off' form)."""
    cos, signed_sin = rope
    rotation = torch.complex(cos[..., 0::2], signed_sin[..., 1::2])
    pairs = x.to(torch.promote_types(x.dtype, torch.float32)).unflatten(-1, (-1, 2))
    return torch.view_as_real(torch.view_as_complex(pairs.contiguous()) * rotation).flatten(-2).to(x.dtype)


def _project(module: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
    if isinstance(module, nn.Linear):
        return F.linear(x, weight)
    return module._conv_forward(x.transpose(1, 2), weight, None).transpose(1, 2)


def split_swiglu_forward(self: SwiGLU, x: Tensor) -> Tensor:
    """The previous SwiGLU: w1 and w3 as two projections (the 'off' form)."""
    w1, w3 = self.w13.weight.chunk(2, dim=0)
    return self.w2(F.silu(_project(self.w13, x, w1)) * _project(self.w13, x, w3))


@contextmanager
def patched(owner: object, name: str, value: object) -> Iterator[None]:
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def sampling_seconds(pipe: Pipeline, prepared: PreparedRequest, noise: Tensor, plan: Plan) -> float:
    """Sampling seconds with a freshly captured graph (so that a patched form is what gets captured)."""
    if pipe.device.type == "cuda":
        pipe.graphed_sampler = GraphedEulerSampler(pipe.flow)
    with torch.inference_mode():
        features = pipe.encode([prepared])
        return median_seconds(lambda: pipe.sample(features, noise, plan.steps, plan.cfg), pipe.device, plan.repeats)


def flow_forms(pipe: Pipeline, video: Path, plan: Plan) -> dict[str, float]:
    request = batch_requests(1, plan.duration, plan.steps, plan.cfg, video, "forms")[0]
    prepared = pipe.prepare(request)
    noise = pipe.initial_noise([prepared])
    with torch.inference_mode():
        reference = sampled_latents(pipe, prepared, noise, plan)
    results = {"new forms b1 sampling_s": sampling_seconds(pipe, prepared, noise, plan)}
    with patched(model.flow, "apply_rope", complex_rope):
        results["complex RoPE b1 sampling_s"] = sampling_seconds(pipe, prepared, noise, plan)
        results["complex RoPE latents relative"] = relative_error(
            sampled_latents(pipe, prepared, noise, plan), reference
        )
    with patched(SwiGLU, "forward", split_swiglu_forward):
        results["split SwiGLU b1 sampling_s"] = sampling_seconds(pipe, prepared, noise, plan)
        results["split SwiGLU latents relative"] = relative_error(
            sampled_latents(pipe, prepared, noise, plan), reference
        )
    if pipe.device.type == "cuda":
        pipe.graphed_sampler = GraphedEulerSampler(pipe.flow)
    return results


@torch.inference_mode()
def vocoder_forms(pipe: Pipeline, plan: Plan, batch: int) -> dict[str, float]:
    """Vocoder seconds on the mel of an 8 s clip with each activation form; the compiled one after its compile."""
    latent_len = pipe.prepare(GenerationRequest(prompt="", duration=plan.duration)).lengths.latent
    latents = torch.randn(batch, latent_len, pipe.audio.latent_dim, device=pipe.device, dtype=pipe.decoder_dtype)
    mel = pipe.vae.decode(latents)
    activations = [m for m in pipe.vocoder.modules() if isinstance(m, AntiAliasedSnakeBeta)]
    compiled = torch.compile(sliced_anti_aliased_snake, dynamic=True)
    reference = pipe.vocoder(mel).float()
    results = {"activations": len(activations), "mel_frames": mel.shape[-1]}
    for label, form in (
        ("convolutions", None),
        ("sliced eager", sliced_anti_aliased_snake),
        ("sliced compiled", compiled),
    ):
        for m in activations:
            m.sliced = form
        try:
            started = time.perf_counter()
            waveform = pipe.vocoder(mel).float()  # the compiled form compiles here
            synchronize(pipe.device)
            results[f"{label} first_s"] = time.perf_counter() - started
            results[f"{label} s"] = median_seconds(lambda: pipe.vocoder(mel), pipe.device, plan.repeats)
            results[f"{label} relative"] = relative_error(waveform, reference)
        finally:
            for m in activations:
                m.sliced = None
    return results


@torch.inference_mode()
def cudnn_benchmark(pipe: Pipeline, plan: Plan) -> dict[str, float]:
    latent_len = pipe.prepare(GenerationRequest(prompt="", duration=plan.duration)).lengths.latent
    results = {}
    for batch in plan.batches:
        latents = torch.randn(batch, latent_len, pipe.audio.latent_dim, device=pipe.device, dtype=pipe.dtype)
        for flag in (False, True):
            torch.backends.cudnn.benchmark = flag
            results[f"decode b{batch} benchmark={flag} s"] = median_seconds(
                lambda lat=latents: pipe.decode(lat), pipe.device, plan.repeats, warmup=2
            )
    torch.backends.cudnn.benchmark = True
    return results


# ---------------------------------------------------------------------------------------------
# precision


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


@torch.inference_mode()
def stage_outputs(pipe: Pipeline, prepared: PreparedRequest, noise: Tensor, plan: Plan) -> dict[str, Tensor]:
    features = pipe.encode([prepared])
    velocities: list[Tensor] = []

    def keep_first_velocity(step: int, t: Tensor, x: Tensor, velocity: Tensor) -> None:
        if step == 0:
            velocities.append(velocity.clone())

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


def against_fp32(
    low: Pipeline, fp32: Pipeline, expected: dict[str, Tensor], prepared: PreparedRequest, noise: Tensor, plan: Plan
) -> dict[str, Any]:
    actual = stage_outputs(low, prepared, noise, plan)
    errors: dict[str, Any] = {key: relative_error(actual[key], expected[key]) for key in expected}
    errors["non-finite"] = {key: int((~torch.isfinite(value)).sum()) for key, value in actual.items()}
    with torch.inference_mode():
        _, waveform = fp32.decode(actual["latents"].float())
    errors["waveform, fp32 decoders"] = relative_error(waveform, expected["waveform"])
    result = low.generate_prepared([prepared])[0]  # through the guard
    errors["generation dtype_fallback"] = result.metadata.get("dtype_fallback")
    errors["largest |activation| of the first velocity"] = actual["first velocity"].abs().max().item()
    return errors


def precision(arch: Any, device: str, video: Path, plan: Plan, record: Record) -> None:
    fp32 = random_pipeline(arch, device, torch.float32)  # the same seed: the same weights
    request = batch_requests(1, plan.duration, plan.steps, plan.cfg, video, "precision")[0]
    prepared = fp32.prepare(request)
    noise = fp32.initial_noise([prepared])
    with exact_float32():
        expected = stage_outputs(fp32, prepared, noise, plan)
    for dtype in (torch.bfloat16, torch.float16):
        name = str(dtype).removeprefix("torch.")

        def compare(dtype: torch.dtype = dtype) -> dict[str, Any]:
            low = low_precision_pipeline(arch, device, dtype)
            try:
                return against_fp32(low, fp32, expected, prepared, noise, plan)
            finally:
                del low

        record.item("precision", f"{name} vs float32", compare)
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# an upload's path, HTTP aside


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


# on a CPU, bench/long_video.py's own rehearsal of its GPU section (12 s, tiny weights) instead of 10 minutes
LONG_VIDEO_REHEARSAL = ("--device", "cpu", "--tiny", "--minutes", "0.2", "--size", "320x180", "--steps", "1")


def long_video(device: str, timeout: float) -> dict[str, Any]:
    """bench/long_video.py --gpu (issue 10's 10-minute clip, target at most 30 s on one H200)."""
    flags = ("--gpu",) if device.startswith("cuda") else ("--gpu", *LONG_VIDEO_REHEARSAL)
    done = subprocess.run(
        [sys.executable, "-m", "bench.long_video", *flags], capture_output=True, text=True, timeout=timeout
    )
    return {"returncode": done.returncode, "stdout_tail": done.stdout[-3000:], "stderr_tail": done.stderr[-1500:]}


# ---------------------------------------------------------------------------------------------


def summary(data: dict[str, Any], plan: Plan) -> str:
    lines = [f"\n{plan.variant}, {plan.duration:g} s, {plan.steps} steps (tiny: {plan.tiny}); targets of issue 13"]
    for section in ("baseline", "compiled"):
        for key, m in data[section].items():
            if isinstance(m, dict) and "model" in m:
                lines.append(
                    f"  {section:9s} {key:4s} model {m['model']:.3f} s, {m['clips_per_second']:.2f} clips/s, "
                    f"sampling {m['stages']['sampling']:.3f}, clip {m['stages']['clip']:.3f}, "
                    f"sync {m['stages']['sync']:.3f}, vocoder {m['stages']['vocoder']:.3f}, peak {m['peak_gpu_gb']} GB"
                )
    for key, errors in data["precision"].items():
        lines.append(
            f"  {key}: waveform {errors['waveform']:.2e}, latents {errors['latents']:.2e}, "
            f"fallback {errors['generation dtype_fallback']}"
        )
    if data["ceilings"]:
        c = data["ceilings"]["roofs"]
        lines.append(f"  ceilings: {c['bf16_matmul_tflops']:.0f} TFLOP/s bf16, {c['copy_gb_per_s']:.0f} GB/s copy")
    lines.append(f"  targets: {TARGETS}")
    lines.append(f"  errors: {list(data['errors'])}; skipped: {data['skipped']}")
    return "\n".join(lines)


def eager_sections(
    pipe: Pipeline, video: Path, folder: Path, plan: Plan, sections: tuple[str, ...], record: Record
) -> None:
    """The items measured on the bf16 pipeline with eager modules (it is freed when this returns)."""
    for batch in plan.batches if "baseline" in sections else ():
        record.item("baseline", f"b{batch}", lambda b=batch: timings(pipe, video, plan, b))
    if "profile" in sections:
        record.item("profile", "guided step b1", lambda: profile_step(pipe, video, plan))
    if "forms" in sections:
        record.item("forms", "flow b1", lambda: flow_forms(pipe, video, plan))
        for batch in plan.batches:
            record.item("forms", f"vocoder b{batch}", lambda b=batch: vocoder_forms(pipe, plan, b))
    if "cudnn" in sections and pipe.device.type == "cuda":
        record.item("cudnn", "decode", lambda: cudnn_benchmark(pipe, plan))
    if "e2e" in sections:
        record.item("e2e", "upload to mp4", lambda: end_to_end(pipe, folder, plan))


def low_precision_pipeline(arch: Any, device: str, dtype: torch.dtype, **options: Any) -> Pipeline:
    """A bf16 / fp16 pipeline; on a CPU (rehearsals) with float32 decoders, as half-precision convolutions are
    emulated there (minutes for the tiny vocoder)."""
    if torch.device(device).type == "cpu":
        options.setdefault("decoder_dtype", torch.float32)
    return random_pipeline(arch, device, dtype, **options)


def run(plan: Plan, device: str, out: Path, time_limit: float, sections: tuple[str, ...]) -> None:
    record = Record(out, time_limit, machine=machine(device), plan=asdict(plan), device=device, time_limit_s=time_limit)
    arch = architecture(plan.variant, plan.tiny)
    dev = torch.device(device)
    with tempfile.TemporaryDirectory() as tmp:
        video = make_clip(Path(tmp), plan.duration)
        if "ceilings" in sections:
            record.item("ceilings", "roofs", lambda: ceilings(dev, plan.tiny))
        eager_sections(low_precision_pipeline(arch, device, torch.bfloat16), video, Path(tmp), plan, sections, record)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        if "precision" in sections:
            precision(arch, device, video, plan, record)
        if "e2e" in sections:
            record.item("e2e", "long video", lambda: long_video(device, max(30.0, time_limit - record.elapsed())))
        if "compiled" in sections:
            compiled = low_precision_pipeline(arch, device, torch.bfloat16, compile_modules=True)
            record.item("compiled", "first calls", lambda: first_call(compiled, video, plan))
            for batch in plan.batches:
                record.item("compiled", f"b{batch}", lambda b=batch: timings(compiled, video, plan, b))

            def against_eager() -> dict[str, float]:
                eager = low_precision_pipeline(arch, device, torch.bfloat16)
                prepared = eager.prepare(batch_requests(1, plan.duration, plan.steps, plan.cfg, video, "cmp")[0])
                noise = eager.initial_noise([prepared])
                latents = sampled_latents(eager, prepared, noise, plan)
                return {"latents relative": relative_error(sampled_latents(compiled, prepared, noise, plan), latents)}

            record.item("compiled", "against eager", against_eager)
    record.save()
    print(summary(record.data, plan))
    print(f"\n{json.dumps(record.data['machine'])}\nwritten {out} after {record.data['wall_s']:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the results")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny architecture, 1 s, 2 steps, batch 1 and 2")
    parser.add_argument("--time-limit", type=float, default=450.0, help="start no item after this (s)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    args = parser.parse_args()
    plan = TINY if args.tiny else Plan()
    run(plan, args.device, args.out, args.time_limit, tuple(args.sections.split(",")))


if __name__ == "__main__":
    main()
