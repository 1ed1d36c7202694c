"""Per-stage timings of whole generations, with random full-size weights (or the tiny architecture).

    .venv/bin/python -m bench.stages [--variant large_44k_v2] [--duration 8] [--batch 1] [--steps 25]
        [--cfg 4.5] [--dtype bf16|fp16|fp32] [--device cuda|cpu] [--repeats 3] [--warmup 1] [--mode video|text]
        [--tiny] [--torch-threads N]

Weights are normals scaled by the weight recipe's per-key rules (``model.recipe.init_value``) but drawn
by torch on the target device: the recipe's own bit-stable float64 generator needs minutes for the ~2B
values of a full-size variant.  They go through the official loaders (``model.build.pipeline_from_state_dicts``),
so weight-norm folding and the VAE's weight normalisation happen as for real files.

Every request of a batch has its own prompt (the text encoder really runs; only the empty negative
prompt's features come from the cache, as for real traffic) and, in video mode, decodes its own
copy of a generated mp4 (64 CLIP frames for 8 s).  Stage times are the pipeline's own (it synchronises
the GPU after each stage); "model" is everything but the CPU video decode.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import Tensor, nn

from model.build import VARIANTS, Architecture, pipeline_from_state_dicts
from model.flow import FlowNetwork
from model.pipeline import GenerationResult, Pipeline
from model.recipe import init_value
from model.request import GenerationRequest
from model.synchformer import VISUAL_PREFIX, Synchformer
from model.testkit import make_video
from model.vae import VAEDecoder
from model.vocoder import BigVGAN

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODEL_STAGES = ("clip", "sync", "text", "sampling", "vae", "vocoder")
CLIP_SIZE = (640, 360)  # the decode is not what this measures (bench/video_io does): a small frame keeps it short
CLIP_FPS = 25

# The official code on one H100: bf16, 8 s, 25 steps, cfg 4.5, random weights (issue 4), for comparison.
# "model" is the "whole generation".
OFFICIAL_FIELDS = ("model", "sampling", "clip", "sync", "text", "vae", "vocoder", "peak_gpu_gb")
OFFICIAL_H100 = {
    ("small_16k", 1): (1.43, 0.94, 0.15, 0.06, 0.01, 0.004, 0.04, 4.8),
    ("small_16k", 8): (3.66, 1.20, 1.24, 0.48, 0.02, 0.004, 0.26, 18.4),
    ("large_44k_v2", 1): (2.34, 1.83, 0.15, 0.06, 0.01, 0.008, 0.09, 6.8),
    ("large_44k_v2", 8): (4.84, 2.25, 1.25, 0.48, 0.02, 0.007, 0.70, 20.2),
}


# ---------------------------------------------------------------------------------------------
# random full-size pipelines


def random_state_dict(module: nn.Module, generator: torch.Generator) -> dict[str, Tensor]:
    """Recipe-scaled normals for every learned key of ``module`` (may live on the meta device); model constants
    (filter taps, mel statistics) as the module built them."""
    out = {}
    for key, value in module.state_dict().items():
        z = torch.randn(value.shape, generator=generator, device=generator.device)
        weight = init_value(key, value.shape, z)
        out[key] = value.to(generator.device) if weight is None else weight
    return out


def random_state_dicts(arch: Architecture, device: str | torch.device, seed: int = 0) -> dict[str, dict[str, Tensor]]:
    """State dicts in the official files' formats, as ``model.build.pipeline_from_state_dicts`` takes them."""
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):  # big skeletons: shapes only
        flow, clip, synchformer = (
            FlowNetwork(arch.flow),
            open_clip.CLIP(**arch.clip.model_cfg),
            Synchformer(arch.synchformer),
        )
    return {
        "flow": random_state_dict(flow, generator),
        "clip": random_state_dict(clip, generator),
        "synchformer": {VISUAL_PREFIX + k: v for k, v in random_state_dict(synchformer, generator).items()},
        # built for real: their constants are needed
        "vae": random_state_dict(VAEDecoder(arch.vae), generator),
        "vocoder": random_state_dict(BigVGAN(arch.vocoder), generator),
    }


def random_pipeline(
    arch: Architecture, device: str | torch.device, dtype: torch.dtype, seed: int = 0, **options: Any
) -> Pipeline:
    """Equal seeds give equal weights (in any dtype): the generator runs on ``device`` in float32.
    ``options``: further Pipeline arguments (compile_modules, decoder_dtype, ...)."""
    info = {"kind": "random", "random_weights": True, "id": f"random-{arch.variant}-seed{seed}"}
    state_dicts = random_state_dicts(arch, device, seed)
    pipe = pipeline_from_state_dicts(arch, state_dicts, info, device=device, dtype=dtype, **options)
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # the float32 state dicts are gone
    return pipe


def architecture(variant: str, tiny: bool) -> Architecture:
    return Architecture.tiny(variant) if tiny else Architecture.official(variant)


# ---------------------------------------------------------------------------------------------
# measuring


@dataclass
class Measurement:
    """Median seconds per stage over the repeats (stages shared by the batch counted once)."""

    batch: int
    repeats: int
    stages: dict[str, float]  # MODEL_STAGES, plus "video": the CPU decode of every request together
    model: float  # features + sampling + VAE + vocoder
    total: float  # the whole generate_batch call, decoding included
    peak_gpu_gb: float | None

    @property
    def clips_per_second(self) -> float:
        return self.batch / self.model


def machine(device: str | torch.device) -> dict[str, Any]:
    info = {
        "host_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if torch.device(device).type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return info


def make_clip(folder: Path, seconds: float) -> Path:
    """A real H.264 mp4 a little longer than ``seconds`` (so that no request gets shortened)."""
    return make_video(folder / "clip.mp4", seconds + 1, CLIP_FPS, CLIP_SIZE, texture=True)


def batch_requests(
    batch: int, duration: float, steps: int, cfg: float, video: Path | None, tag: str
) -> list[GenerationRequest]:
    return [
        GenerationRequest(
            prompt=f"rain on a tin roof, take {tag}.{i}",
            duration=duration,
            num_steps=steps,
            cfg_strength=cfg,
            seed=i,
            video=video,
        )
        for i in range(batch)
    ]


def timed_generation(pipe: Pipeline, requests: Sequence[GenerationRequest]) -> tuple[list[GenerationResult], float]:
    """The results and the peak GPU memory (GB) of one generate_batch call."""
    cuda = pipe.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(pipe.device)
        torch.cuda.reset_peak_memory_stats(pipe.device)
    results = pipe.generate_batch(requests)
    peak = torch.cuda.max_memory_allocated(pipe.device) / 1e9 if cuda else None
    return results, peak


def measure(
    pipe: Pipeline, requests: Callable[[str], list[GenerationRequest]], warmup: int, repeats: int
) -> Measurement:
    """``requests(tag)`` makes each run's batch (a fresh tag: fresh prompts)."""
    for i in range(warmup):
        pipe.generate_batch(requests(f"warmup{i}"))
    runs, peaks = [], []
    for i in range(repeats):
        results, peak = timed_generation(pipe, requests(f"run{i}"))
        timings = results[0].metadata["timings"]
        stages = {stage: timings[stage] for stage in MODEL_STAGES}
        stages["video"] = sum(r.metadata["timings"]["video"] for r in results)
        runs.append({**stages, "model": sum(stages[s] for s in MODEL_STAGES), "total": timings["total"]})
        peaks.append(peak)

    def median(key: str) -> float:
        return statistics.median(run[key] for run in runs)

    return Measurement(
        batch=len(results),
        repeats=repeats,
        stages={key: median(key) for key in (*MODEL_STAGES, "video")},
        model=median("model"),
        total=median("total"),
        peak_gpu_gb=None if peaks[0] is None else max(peaks),
    )


def as_json(m: Measurement) -> dict[str, Any]:
    return {**asdict(m), "clips_per_second": m.clips_per_second}


# ---------------------------------------------------------------------------------------------
# printing


def _seconds(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def table(columns: Mapping[str, Measurement], official: Mapping[str, Mapping[str, float]] | None = None) -> str:
    """The issue's table: one column per measurement; official numbers in brackets where given."""
    official = official or {}

    def cell(name: str, keys: Sequence[str], values: Sequence[float]) -> str:
        text = " / ".join(_seconds(v) for v in values)
        ref = official.get(name)
        if ref and all(k in ref for k in keys):
            text += " (" + " / ".join(_seconds(ref[k]) for k in keys) + ")"
        return text

    rows: list[tuple[str, list[str]]] = []
    for label, keys in (
        ("model: features+sampling+VAE+vocoder", ("model",)),
        ("flow sampling", ("sampling",)),
        ("CLIP / Synchformer / text", ("clip", "sync", "text")),
        ("VAE / vocoder", ("vae", "vocoder")),
    ):
        rows.append(
            (
                label,
                [cell(n, keys, [m.model if k == "model" else m.stages[k] for k in keys]) for n, m in columns.items()],
            )
        )
    rows.append(("video decode (CPU, all requests)", [_seconds(m.stages["video"]) for m in columns.values()]))
    rows.append(("whole generate_batch call", [_seconds(m.total) for m in columns.values()]))
    rows.append(("clips / s (model)", [f"{m.clips_per_second:.2f}" for m in columns.values()]))
    if any(m.peak_gpu_gb is not None for m in columns.values()):
        peaks = [cell(n, ("peak_gpu_gb",), [m.peak_gpu_gb or 0.0]) + " GB" for n, m in columns.items()]
        rows.append(("peak GPU memory", peaks))
    header = ["", *columns]
    body = [[label, *cells] for label, cells in rows]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in [header, *body]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def official_reference(variant: str, batch: int) -> dict[str, float] | None:
    values = OFFICIAL_H100.get((variant, batch))
    return None if values is None else dict(zip(OFFICIAL_FIELDS, values, strict=True))


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=VARIANTS, default="large_44k_v2")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--cfg", type=float, default=4.5)
    parser.add_argument("--dtype", choices=DTYPES, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--mode", choices=("video", "text"), default="video")
    parser.add_argument("--tiny", action="store_true", help="the tiny preset's architecture instead of full size")
    parser.add_argument("--torch-threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", type=Path, help="also write the measurement here")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    dtype = DTYPES[args.dtype or ("bf16" if torch.device(args.device).type == "cuda" else "fp32")]

    start = time.perf_counter()
    pipe = random_pipeline(architecture(args.variant, args.tiny), args.device, dtype)
    print(f"built {'tiny' if args.tiny else 'full-size'} {args.variant} in {time.perf_counter() - start:.1f} s")
    with tempfile.TemporaryDirectory() as tmp:
        video = make_clip(Path(tmp), args.duration) if args.mode == "video" else None
        measurement = measure(
            pipe,
            lambda tag: batch_requests(args.batch, args.duration, args.steps, args.cfg, video, tag),
            args.warmup,
            args.repeats,
        )
    size, dtype_name = "tiny" if args.tiny else "full-size", str(dtype).removeprefix("torch.")
    print(
        f"\n{size} {args.variant}, {args.mode}, {args.duration:g} s, batch {args.batch}, {args.steps} steps, "
        f"cfg {args.cfg:g}, {dtype_name} on {args.device}; seconds, median of {args.repeats}"
    )
    name = f"{args.variant} b{args.batch}"
    reference = official_reference(args.variant, args.batch)
    official = {name: reference} if reference and not args.tiny and args.device.startswith("cuda") else None
    if official:
        print("(in brackets: the official code on an H100, issue 4)")
    print(table({name: measurement}, official))
    info = machine(args.device)
    print(json.dumps(info))
    if args.json:
        record = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "result": as_json(measurement)}
        args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
