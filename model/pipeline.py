"""The whole generation: video, image or nothing + prompts in, waveform out.  Loaded once, generates many.

model.build makes Pipelines (architectures, weights); this module runs them.
Stages (each a method, so that the parity harness can record every intermediate):
  prepare  - CPU: decode the video or image into uint8 model frames; fixes the effective duration
  encode   - CLIP image features (8 fps), Synchformer features (25 fps), CLIP text features
  sample   - Euler flow matching with classifier-free guidance from seeded noise
  decode   - latent statistics, VAE decoder to a mel spectrogram, BigVGAN vocoder to a waveform

Requests with the same sequence lengths and step count run as one batch.  Nothing about a request
(its duration in particular) is stored on the modules, so any mix of requests can share one Pipeline.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from model.clip import ClipEncoder
from model.flow import Conditions, FlowNetwork
from model.frame_path import FramePath
from model.graphs import GraphedEulerSampler
from model.request import GenerationRequest
from model.sampler import euler_sample
from model.sequence import MIN_DURATION, SYNC_SEGMENT, SYNC_STEP, SYNC_TOKENS_PER_SEGMENT, SequenceLengths
from model.synchformer import Synchformer
from model.vae import VAEDecoder
from model.video import VideoInputs, clip_input, load_image, load_video, sync_input
from model.vocoder import BigVGAN

if TYPE_CHECKING:  # model.build makes Pipelines, so it imports this module
    from model.build import Architecture

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepDetail:
    """Where sampling is: window ``window`` of ``windows`` (1-based; one window unless the request is longer
    than the variant's training length), step ``step`` of ``steps`` within it."""

    window: int
    windows: int
    step: int
    steps: int


# (stage, fraction done of the stage, detail while sampling); raising from it stops the generation
ProgressCallback = Callable[[str, float, StepDetail | None], None]


def _no_progress(stage: str, fraction: float, detail: StepDetail | None) -> None:
    pass


class Cancelled(Exception):
    """Raised by a progress callback to stop a generation between steps."""


@dataclass
class GenerationResult:
    audio: Tensor  # (num_samples, N) float32 on CPU, N = duration * sample_rate
    sample_rate: int
    duration: float
    metadata: dict[str, Any]


@dataclass
class PreparedRequest:
    """A request after the CPU work (decoding); safe to make on another thread while the GPU runs."""

    request: GenerationRequest
    duration: float
    lengths: SequenceLengths
    frames: VideoInputs | None  # None for text-to-audio
    is_image: bool
    decode_seconds: float

    @property
    def batch_key(self) -> tuple[SequenceLengths, int]:
        return self.lengths, self.request.num_steps


@dataclass
class Features:
    """Raw encoder outputs, one row per sample (requests repeated num_samples times)."""

    clip: Tensor  # (N, clip_len, clip_dim)
    sync: Tensor  # (N, sync_len, sync_dim)
    text: Tensor  # (N, 77, text_dim)
    negative_text: Tensor  # (N, 77, text_dim): encoded negative prompts, or the learned empty-prompt features
    timings: dict[str, float] = field(default_factory=dict)


@contextmanager
def _stage(timings: dict[str, float], name: str, device: torch.device) -> Iterator[None]:
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


class Pipeline:
    def __init__(
        self,
        architecture: Architecture,
        flow: FlowNetwork,
        clip: ClipEncoder,
        synchformer: Synchformer,
        vae: VAEDecoder,
        vocoder: BigVGAN,
        weights_info: Mapping[str, Any],
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        frame_path: FramePath = "exact",
        encoder_chunk: int = 64,
        cuda_graphs: bool = True,
        decoder_dtype: torch.dtype | None = None,
        compile_modules: bool = False,
        compile_mode: CompileMode = "default",
        cudnn_benchmark: bool = True,
    ) -> None:
        self.architecture = architecture
        self.variant = architecture.variant
        self.audio = architecture.audio
        self.sample_rate = architecture.audio.sampling_rate
        self.device = torch.device(device)
        self.dtype = dtype
        self.frame_path = frame_path
        self.encoder_chunk = encoder_chunk  # frames / segments per encoder call: bounds activation memory
        self.weights_info = dict(weights_info)
        # the decoders are cheap next to the flow network; float32 there keeps bf16 output close to float32's
        self.decoder_dtype = decoder_dtype or dtype
        self.flow, self.clip, self.synchformer = (m.to(self.device, dtype).eval() for m in (flow, clip, synchformer))
        self.vae, self.vocoder = (m.to(self.device, self.decoder_dtype).eval() for m in (vae, vocoder))
        self._text_cache: dict[str, Tensor] = {}
        # kernel launches, not arithmetic, bound the flow network on a GPU: replay captured steps there
        self.graphed_sampler = GraphedEulerSampler(self.flow) if cuda_graphs and self.device.type == "cuda" else None
        if self.device.type == "cuda":  # every batch shape is fixed: cuDNN may time its algorithms once per shape
            torch.backends.cudnn.benchmark = cudnn_benchmark
        if compile_modules:
            compile_pipeline_modules(self, compile_mode)

    # -- stages ----------------------------------------------------------------------------------

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """Decode the request's video or image (CPU only) and fix its effective duration."""
        validate(request)
        if request.video is not None and request.image is not None:
            raise ValueError("give a video or an image, not both")
        start = time.perf_counter()
        frames = None
        duration = request.duration
        if request.video is not None:
            wanted = math.inf if request.duration is None else request.duration
            frames = load_video(request.video, wanted, frame_path=self.frame_path)
            duration = frames.duration_sec
        elif request.image is not None:
            frames = load_image(request.image, request.duration)
        lengths = SequenceLengths.for_duration(duration, self.audio)
        if lengths.clip < 1 or lengths.sync < 1:
            needed = f"at least {MIN_DURATION:.2f} s of video is needed"
            raise ValueError(f"duration {duration:.3f} s is too short: {needed}")
        return PreparedRequest(
            request, duration, lengths, frames, request.image is not None, time.perf_counter() - start
        )

    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """(N, 77, text_dim) CLIP text features; repeated prompts (the empty negative one) come from a cache."""
        missing = sorted({p for p in prompts if p not in self._text_cache})
        if missing:
            encoded = self.clip.encode_prompts(missing)
            if len(self._text_cache) > 256:  # a bound, not an eviction policy: prompts rarely repeat
                self._text_cache.clear()
            self._text_cache.update(zip(missing, encoded, strict=True))
        return torch.stack([self._text_cache[p] for p in prompts])

    def encode(self, batch: Sequence[PreparedRequest]) -> Features:
        """Encoder features of a batch of requests with equal lengths, one row per sample."""
        lengths = batch[0].lengths
        timings: dict[str, float] = {}
        flow = self.flow
        clip_rows, sync_rows = [], []
        with _stage(timings, "clip", self.device):
            videos = [p for p in batch if p.frames is not None and not p.request.mask_away_clip]
            if videos:
                frames = torch.cat([clip_input(p.frames.clip_u8.to(self.device)) for p in videos])
                encoded = self.clip.encode_images(frames.unsqueeze(0), self.encoder_chunk).squeeze(0)
                encoded = iter(encoded.split([p.frames.clip_u8.shape[0] for p in videos]))
            for p in batch:
                if p.frames is None or p.request.mask_away_clip:
                    rows = flow.empty_clip_features(1, lengths.clip)[0]
                elif p.is_image:
                    rows = next(encoded).expand(lengths.clip, -1)  # one image stands for every CLIP frame
                else:
                    rows = next(encoded)
                clip_rows.append(rows)
        with _stage(timings, "sync", self.device):
            movies = [p for p in batch if p.frames is not None and not p.is_image]
            if movies:
                # equal sync lengths mean equal segment counts; frames past the last segment are never used
                used = (lengths.sync // SYNC_TOKENS_PER_SEGMENT - 1) * SYNC_STEP + SYNC_SEGMENT
                frames = torch.stack([sync_input(p.frames.sync_u8[:used].to(self.device)) for p in movies])
                sync = iter(self.synchformer.encode_video(frames, self.encoder_chunk))
            for p in batch:
                if p.frames is None or p.is_image:
                    sync_rows.append(flow.empty_sync_features(1, lengths.sync)[0])
                else:
                    sync_rows.append(next(sync))
        with _stage(timings, "text", self.device):
            text = self.encode_prompts([p.request.prompt for p in batch])
            negatives = [p.request.negative_prompt for p in batch]
            given = [n for n in negatives if n is not None]
            negative_given = iter(self.encode_prompts(given)) if given else iter(())
            learned = flow.empty_text_features(1)[0]
            negative = [learned if n is None else next(negative_given) for n in negatives]

        def rows(per_request: Sequence[Tensor]) -> Tensor:
            repeats = [p.request.num_samples for p in batch]
            pairs = zip(per_request, repeats, strict=True)
            return torch.cat([r.to(self.dtype).unsqueeze(0).expand(n, *r.shape) for r, n in pairs])

        return Features(rows(clip_rows), rows(sync_rows), rows(list(text)), rows(negative), timings)

    def initial_noise(self, batch: Sequence[PreparedRequest]) -> Tensor:
        """Each request's noise exactly as the official generate draws it: randn(num_samples, L, D) from a
        generator on the pipeline's device seeded with the request's seed (its only consumer)."""
        noise = []
        for p in batch:
            rng = torch.Generator(device=self.device).manual_seed(p.request.seed)
            shape = (p.request.num_samples, p.lengths.latent, self.audio.latent_dim)
            noise.append(torch.randn(shape, generator=rng, device=self.device, dtype=self.dtype))
        return torch.cat(noise)

    def conditions(self, features: Features, latent_len: int) -> tuple[Conditions, Conditions]:
        """Conditional and unconditional (negative) conditions, computed once for all steps."""
        flow = self.flow
        cond = flow.preprocess_conditions(features.clip, features.sync, features.text, latent_len)
        uncond = flow.empty_conditions(
            features.clip.shape[0], latent_len, features.clip.shape[1], features.sync.shape[1], features.negative_text
        )
        return cond, uncond

    def sample(
        self,
        features: Features,
        x0: Tensor,
        num_steps: int,
        cfg_strength: float | Tensor,
        on_step: Callable[[int, Tensor, Tensor, Tensor], None] | None = None,
    ) -> Tensor:
        """Guided Euler sampling from x0 (N, L, D); returns the normalised latents at t = 1."""
        cond, uncond = self.conditions(features, x0.shape[1])
        if self.graphed_sampler is not None:
            cfg = torch.as_tensor(cfg_strength, dtype=torch.float32)
            try:
                return self.graphed_sampler.sample(x0, cond, uncond, cfg, num_steps, on_step)
            except RuntimeError:  # a capture failure must cost speed, not the job
                log.exception("CUDA graph sampling failed; sampling eagerly from now on")
                self.graphed_sampler = None
        return euler_sample(
            lambda t, x: self.flow.guided_flow(t, x, cond, uncond, cfg_strength), x0, num_steps, on_step
        )

    def decode(self, latents: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised latents (N, L, D) -> (mel (N, n_mels, 2L), waveform (N, 1, 2 L hop))."""
        mel = self.vae.decode(self.flow.unnormalize(latents).to(self.decoder_dtype))
        return mel, self.vocoder(mel)

    # -- generation ------------------------------------------------------------------------------

    def generate(self, request: GenerationRequest, progress: ProgressCallback | None = None) -> GenerationResult:
        return self.generate_batch([request], progress)[0]

    def generate_batch(
        self, requests: Sequence[GenerationRequest], progress: ProgressCallback | None = None
    ) -> list[GenerationResult]:
        """Results in request order; requests with equal lengths and step counts share one batched pass."""
        report = progress or _no_progress
        prepared = []
        for i, request in enumerate(requests):
            prepared.append(self.prepare(request))
            report("video", (i + 1) / len(requests), None)
        return self.generate_prepared(prepared, report)

    @torch.inference_mode()
    def generate_prepared(
        self, prepared: Sequence[PreparedRequest], progress: ProgressCallback | None = None
    ) -> list[GenerationResult]:
        """The GPU part for requests already prepared (a worker decodes the next jobs while this runs)."""
        report = progress or _no_progress
        start = time.perf_counter()
        groups: dict[tuple[SequenceLengths, int], list[int]] = {}
        for i, p in enumerate(prepared):
            groups.setdefault(p.batch_key, []).append(i)
        results: list[GenerationResult | None] = [None] * len(prepared)
        for indices in groups.values():
            batch = [prepared[i] for i in indices]
            for i, result in zip(indices, self._generate_group_finite(batch, report), strict=True):
                results[i] = result
        elapsed = time.perf_counter() - start
        for p, result in zip(prepared, results, strict=True):
            result.metadata["timings"]["total"] = p.decode_seconds + elapsed
        return results

    def _generate_group_finite(
        self, batch: Sequence[PreparedRequest], report: ProgressCallback
    ) -> list[GenerationResult]:
        """``_generate_group``; in float16, a batch whose audio is not finite (an overflow) is run again in
        bfloat16 (float32's range), and its results say so in metadata["dtype_fallback"]."""
        results = self._generate_group(batch, report)
        if self.dtype != torch.float16 or all(bool(torch.isfinite(r.audio).all()) for r in results):
            return results
        log.warning("float16 batch of %d requests gave non-finite audio: running it again in bfloat16", len(batch))
        with running_in(self, torch.bfloat16):
            results = self._generate_group(batch, report)
        for result in results:
            result.metadata["dtype_fallback"] = "bfloat16"
        return results

    def _generate_group(self, batch: Sequence[PreparedRequest], report: ProgressCallback) -> list[GenerationResult]:
        num_steps = batch[0].request.num_steps
        report("features", 0.0, None)
        features = self.encode(batch)
        timings = dict(features.timings)
        report("features", 1.0, None)
        with _stage(timings, "sampling", self.device):
            x0 = self.initial_noise(batch)
            cfg = torch.tensor([p.request.cfg_strength for p in batch for _ in range(p.request.num_samples)])
            report("sampling", 0.0, StepDetail(1, 1, 0, num_steps))

            def on_step(i: int, t: Tensor, x: Tensor, v: Tensor) -> None:
                report("sampling", (i + 1) / num_steps, StepDetail(1, 1, i + 1, num_steps))

            latents = self.sample(features, x0, num_steps, cfg, on_step)
        report("decoding", 0.0, None)
        with _stage(timings, "vae", self.device):
            mel = self.vae.decode(self.flow.unnormalize(latents).to(self.decoder_dtype))
        with _stage(timings, "vocoder", self.device):
            waveform = self.vocoder(mel).float().cpu()[:, 0]
        report("decoding", 1.0, None)

        results, row = [], 0
        for p in batch:
            n = p.request.num_samples
            samples = int(p.duration * self.sample_rate)  # the vocoder makes whole latents: trim the tail
            stage_times = {"video": p.decode_seconds, **timings}
            results.append(
                GenerationResult(
                    waveform[row : row + n, :samples].clone(),
                    self.sample_rate,
                    p.duration,
                    self._metadata(p, stage_times, len(batch)),
                )
            )
            row += n
        return results

    def _metadata(self, p: PreparedRequest, timings: dict[str, float], batch_size: int) -> dict[str, Any]:
        r = p.request
        mode = "video" if p.frames is not None and not p.is_image else "image" if p.is_image else "text"
        return {
            "variant": self.variant,
            "mode": mode,
            "seed": r.seed,
            "duration": p.duration,
            "requested_duration": r.duration,
            "num_steps": r.num_steps,
            "cfg_strength": r.cfg_strength,
            "num_samples": r.num_samples,
            "mask_away_clip": r.mask_away_clip,
            "sample_rate": self.sample_rate,
            "sequence_lengths": {"latent": p.lengths.latent, "clip": p.lengths.clip, "sync": p.lengths.sync},
            "batch_size": batch_size,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "weights": dict(self.weights_info),
            "timings": timings,
        }


CompileMode = Literal["default", "max-autotune-no-cudagraphs"]  # never inductor's own CUDA graphs: we capture ours


def compile_pipeline_modules(pipe: Pipeline, mode: CompileMode) -> None:
    """torch.compile the flow step (inside our per-step CUDA graph when there is one; one compilation per batch
    shape), CLIP's image tower, the Synchformer and the vocoder's activations.  Compilation happens lazily, on
    the first call of each shape (a worker's warm-up pays for the first)."""
    pipe.flow.compile(mode=mode, dynamic=False)
    pipe.clip.clip.visual.compile(mode=mode)
    pipe.synchformer.compile(mode=mode)
    pipe.vocoder.compile_activations(mode)


@contextmanager
def running_in(pipe: Pipeline, dtype: torch.dtype) -> Iterator[None]:
    """Run ``pipe``'s ``pipe.dtype`` parts in ``dtype`` for a while, eagerly: each parameter and buffer of that dtype
    is cast to a copy and put back afterwards, so the original tensors (and the CUDA graphs captured on them) stay
    as they were.  Decoders in another dtype (float32) are left alone."""
    modules = (pipe.flow, pipe.clip, pipe.synchformer, pipe.vae, pipe.vocoder)
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers()) if t.dtype == pipe.dtype]
    originals = [t.data for t in tensors]
    saved = pipe.dtype, pipe.decoder_dtype, pipe.graphed_sampler, dict(pipe._text_cache)
    try:
        for t in tensors:
            t.data = t.data.to(dtype)
        if pipe.decoder_dtype == pipe.dtype:
            pipe.decoder_dtype = dtype
        pipe.dtype = dtype
        pipe.graphed_sampler = None  # a graph captured on the temporary copies would outlive them
        pipe._text_cache.clear()
        with torch.compiler.set_stance("force_eager"):  # a rare path: no compilation for it
            yield
    finally:
        for t, original in zip(tensors, originals, strict=True):
            t.data = original
        pipe.dtype, pipe.decoder_dtype, pipe.graphed_sampler, text_cache = saved
        pipe._text_cache.clear()
        pipe._text_cache.update(text_cache)


def validate(request: GenerationRequest) -> None:
    """Reject requests the model cannot run (the service checks its own, tighter limits first)."""
    if request.duration is None:
        if request.video is None:
            raise ValueError("a duration is needed without a video (none means the whole video)")
    elif not request.duration > 0:
        raise ValueError(f"duration must be positive, got {request.duration}")
    if request.num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {request.num_steps}")
    if request.num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {request.num_samples}")
