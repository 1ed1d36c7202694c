"""The whole generation: video, image or nothing + prompts in, waveform out.  Loaded once, generates many.

model.build makes Pipelines (architectures, weights); this module runs them.
Stages (each a method, so that the parity harness can record every intermediate):
  prepare  - CPU: decode the video or image into uint8 model frames; fixes the effective duration
  encode   - CLIP image features (8 fps), Synchformer features (25 fps), CLIP text features
  sample   - Euler flow matching with classifier-free guidance from seeded noise
  decode   - latent statistics, VAE decoder to a mel spectrogram, BigVGAN vocoder to a waveform

Requests with the same sequence lengths and step count run as one batch.  Nothing about a request
(its duration in particular) is stored on the modules, so any mix of requests can share one Pipeline.

A request longer than the training length (8 s) runs as overlapping windows (model.windows: the plan,
pins and joins); a long video is then streamed, never decoded whole: prepare only reads its first
window's worth of frames to tell it from a short one, and the encode stage decodes it chunk by chunk,
keeping the whole video's CLIP features and each window's sync features.  A request that fits in one
window takes the single-pass path unchanged.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from model.clip import ClipEncoder
from model.flow import Conditions, FlowNetwork
from model.frame_path import FramePath
from model.graphs import GraphedEulerSampler
from model.request import GenerationRequest
from model.sampler import Constraint, euler_sample
from model.sequence import (
    CLIP_FPS,
    LATENT_DOWNSAMPLE,
    MIN_DURATION,
    SYNC_FPS,
    TRAINING_DURATION,
    SequenceLengths,
)
from model.synchformer import Synchformer
from model.vae import VAEDecoder
from model.video import VideoInputs, VideoStream, clip_input, load_image, load_video, sync_input, video_inputs
from model.vocoder import BigVGAN
from model.windows import (
    DEFAULT_OVERLAP,
    DEFAULT_SCHEDULE,
    SCHEDULES,
    Window,
    WindowSchedule,
    check_overlap,
    join_waveforms,
    make_pins,
    plan_windows,
    window_noise,
    window_stride,
)

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
    """A request after the CPU work (decoding); safe to make on another thread while the GPU runs.

    A video longer than one window is not decoded here: ``stream`` reads it during encoding, which fixes its
    duration; until then ``duration`` is the one asked for, or the container's estimate of the whole video.
    """

    request: GenerationRequest
    duration: float
    lengths: SequenceLengths
    frames: VideoInputs | None  # None for text-to-audio and for streamed videos
    is_image: bool
    decode_seconds: float
    stream: VideoStream | None = None
    windowed: bool = False  # longer than one window: generated as overlapping windows

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


@dataclass
class WindowInputs:
    """Per-window encoder outputs of one long request (views into whole-request tensors where they can be)."""

    duration: float  # the request's, fixed by the frames for a streamed video
    windows: list[Window]
    clip: list[Tensor]  # per window (clip_len, clip_dim)
    sync: list[Tensor]  # per window (sync_len, sync_dim)
    text: Tensor  # (77, text_dim)
    negative_text: Tensor

    def features(self, batch: Sequence[Window], rows: int, dtype: torch.dtype) -> Features:
        """Features of a batch of equal-length windows, ``rows`` rows (samples) each."""

        def stacked(per_window: Sequence[Tensor]) -> Tensor:
            return torch.cat([r.to(dtype).unsqueeze(0).expand(rows, *r.shape) for r in per_window])

        count = len(batch)
        return Features(
            stacked([self.clip[w.index] for w in batch]),
            stacked([self.sync[w.index] for w in batch]),
            stacked([self.text] * count),
            stacked([self.negative_text] * count),
        )


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
        window_duration: float = TRAINING_DURATION,
        window_overlap: float = DEFAULT_OVERLAP,
        window_schedule: WindowSchedule = DEFAULT_SCHEDULE,
        window_batch: int = 16,
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
        check_overlap(window_overlap, window_duration)
        if window_schedule not in SCHEDULES:
            raise ValueError(f"window_schedule must be one of {', '.join(SCHEDULES)}, not {window_schedule!r}")
        self.window_duration = window_duration  # seconds of a window: the variant's training length
        self.window_overlap = window_overlap  # seconds shared by neighbouring windows of a long request
        self.window_schedule = window_schedule
        self.window_batch = window_batch  # windows per sampling / decoding call: bounds device memory
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
        frames = stream = None
        duration = request.duration
        if request.video is not None:
            wanted = math.inf if request.duration is None else request.duration
            if wanted <= self.window_duration:
                frames = load_video(request.video, wanted, frame_path=self.frame_path)
            else:
                frames, stream = self._first_window_or_stream(request.video, wanted)
            if frames is not None:
                duration = frames.duration_sec
            else:
                # an estimate until the stream is read; longer than a window in any case
                duration = min(wanted, max(stream.container_sec or 0.0, self.window_duration))
        elif request.image is not None:
            frames = load_image(request.image, request.duration)
        lengths = SequenceLengths.for_duration(duration, self.audio)
        if lengths.clip < 1 or lengths.sync < 1:
            raise ValueError(f"duration {duration:.3f} s is too short: the model needs at least {MIN_DURATION:.2f} s")
        windowed = stream is not None or duration > self.window_duration
        decode_seconds = time.perf_counter() - start
        return PreparedRequest(
            request, duration, lengths, frames, request.image is not None, decode_seconds, stream, windowed
        )

    def _first_window_or_stream(self, path: Path, wanted: float) -> tuple[VideoInputs | None, VideoStream | None]:
        """The video's frames when it fits in one window (exactly what load_video gives), else a stream of it.

        Frames are read until both streams hold more than one window's worth (then the effective duration, a
        minimum of the asked one and the frames' spans, is surely longer: the video is streamed again when
        encoded) or the video ends first (then these are all of its frames)."""
        chunk = self.encoder_chunk
        stream = VideoStream(path, wanted, frame_path=self.frame_path, chunk=chunk)
        clip_u8: list[Tensor] = []
        sync_u8: list[Tensor] = []
        for clip, sync, _ in stream:
            clip_u8 += clip
            sync_u8 += sync
            window = self.window_duration
            if stream.clip_count > CLIP_FPS * window and stream.sync_count > SYNC_FPS * window:
                windows = (window_stride(self.window_overlap, self.window_duration), self.window_duration)
                again = VideoStream(path, wanted, frame_path=self.frame_path, chunk=chunk, sync_windows=windows)
                again.container_sec = stream.container_sec
                return None, again
        return video_inputs(stream, clip_u8, sync_u8), None

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
                # equal sync lengths mean equal segment counts
                used = lengths.sync_frames
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
        constrain: Constraint | None = None,
    ) -> Tensor:
        """Guided Euler sampling from x0 (N, L, D); returns the normalised latents at t = 1.  ``constrain``:
        applied after every step (the pins of a window, model.windows)."""
        cond, uncond = self.conditions(features, x0.shape[1])
        if self.graphed_sampler is not None:
            cfg = torch.as_tensor(cfg_strength, dtype=torch.float32)
            try:
                return self.graphed_sampler.sample(x0, cond, uncond, cfg, num_steps, on_step, constrain)
            except RuntimeError:  # a capture failure must cost speed, not the job
                log.exception("CUDA graph sampling failed; sampling eagerly from now on")
                self.graphed_sampler = None
        return euler_sample(
            lambda t, x: self.flow.guided_flow(t, x, cond, uncond, cfg_strength), x0, num_steps, on_step, constrain
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
        results: list[GenerationResult | None] = [None] * len(prepared)
        for i, p in enumerate(prepared):
            if p.windowed:  # windows batch among themselves, not with other requests
                results[i] = self._generate_windowed(p, report)
            else:
                groups.setdefault(p.batch_key, []).append(i)
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

    # -- long requests: windows ------------------------------------------------------------------

    def _generate_windowed(self, p: PreparedRequest, report: ProgressCallback) -> GenerationResult:
        """A request longer than one window: features, windows sampled with pins, decoded and crossfaded."""
        timings = {"video": p.decode_seconds}
        report("features", 0.0, None)
        inputs = self.window_inputs(p, timings)
        p = replace(p, duration=inputs.duration, lengths=SequenceLengths.for_duration(inputs.duration, self.audio))
        report("features", 1.0, None)
        with _stage(timings, "sampling", self.device):
            latents = self.sample_windows(p.request, inputs, report)
        report("decoding", 0.0, None)
        waveforms = self._decode_windows(inputs.windows, latents, p.request.num_samples, timings, report)
        joined = join_waveforms(inputs.windows, waveforms, self.audio.hop * LATENT_DOWNSAMPLE)
        report("decoding", 1.0, None)
        metadata = self._metadata(p, timings, 1)
        metadata["windows"] = {
            "count": len(inputs.windows),
            "overlap": self.window_overlap,
            "schedule": self.window_schedule,
            "starts": [w.start for w in inputs.windows],
        }
        audio = joined[:, : int(p.duration * self.sample_rate)].clone()
        return GenerationResult(audio, self.sample_rate, p.duration, metadata)

    def plan(self, duration: float) -> list[Window]:
        """The windows of a request of ``duration`` seconds (one: the single-pass request)."""
        return plan_windows(duration, self.audio, self.window_overlap, self.window_duration)

    def _clip_features(self, frames_u8: Tensor) -> Tensor:
        """(T, clip_dim) CLIP features of uint8 frames (as encode computes them for one video)."""
        return self.clip.encode_images(clip_input(frames_u8.to(self.device)).unsqueeze(0), self.encoder_chunk)[0]

    def _sync_features(self, frames_u8: Sequence[Tensor]) -> Tensor:
        """(tokens, sync_dim) Synchformer features of one window's uint8 frames."""
        frames = sync_input(torch.stack(list(frames_u8)).to(self.device)).unsqueeze(0)
        return self.synchformer.encode_video(frames, self.encoder_chunk)[0]

    def window_inputs(self, p: PreparedRequest, timings: dict[str, float] | None = None) -> WindowInputs:
        """The encode stage of a windowed request: its plan and every window's features."""
        timings = {} if timings is None else timings
        request, flow = p.request, self.flow
        with _stage(timings, "text", self.device):
            text = self.encode_prompts([request.prompt])[0]
            negative = request.negative_prompt
            negative_text = flow.empty_text_features(1)[0] if negative is None else self.encode_prompts([negative])[0]
        duration, clip_all, sync_of = p.duration, None, {}
        if p.stream is not None:
            duration, clip_all, sync_of = self._stream_features(p.stream, request.mask_away_clip, timings)
        elif p.is_image and not request.mask_away_clip:
            with _stage(timings, "clip", self.device):
                clip_all = self._clip_features(p.frames.clip_u8)
        windows = self.plan(duration)
        clip, sync = [], []
        for w in windows:
            lengths = w.lengths
            if clip_all is None:
                clip.append(flow.empty_clip_features(1, lengths.clip)[0])
            elif p.is_image:  # one image stands for every CLIP frame
                clip.append(clip_all[0].expand(lengths.clip, -1))
            else:
                clip.append(clip_all[w.clip_start : w.clip_start + lengths.clip])
            sync.append(sync_of[w.index] if p.stream is not None else flow.empty_sync_features(1, lengths.sync)[0])
        return WindowInputs(duration, windows, clip, sync, text, negative_text)

    def _stream_features(
        self, stream: VideoStream, mask_away_clip: bool, timings: dict[str, float]
    ) -> tuple[float, Tensor | None, dict[int, Tensor]]:
        """(duration, the whole video's CLIP features, each window's sync features) from one pass over the video.

        Decoded frames are encoded as they come: CLIP frames chunk by chunk, a window's sync frames once the
        stream has them all.  The frames of the last two windows completed stay until the end: once the video's
        end fixes the duration, one of them may turn out to be the last window, shorter than a full one."""
        full = SequenceLengths.for_duration(self.window_duration, self.audio)
        clip_parts: list[Tensor] = []
        sync_of: dict[int, Tensor] = {}
        frames_of: dict[int, list[Tensor]] = {}
        decoding = time.perf_counter()
        for clip_u8, _, complete in stream:
            timings["video"] = timings.get("video", 0.0) + time.perf_counter() - decoding  # the stream's decoding
            if clip_u8 and not mask_away_clip:
                with _stage(timings, "clip", self.device):
                    clip_parts.append(self._clip_features(torch.stack(clip_u8)))
            for index, frames in complete:
                if len(frames) >= full.sync_frames:
                    with _stage(timings, "sync", self.device):
                        sync_of[index] = self._sync_features(frames[: full.sync_frames])
                # the plan's last window is one of the last two opened (a window opens on its first frame)
                frames_of = {i: f for i, f in frames_of.items() if i == index - 1} | {index: frames}
            decoding = time.perf_counter()
        duration = stream.duration_sec
        for w in self.plan(duration):
            if w.index not in sync_of or w.lengths.sync != full.sync:  # the last window, shorter than a full one
                frames = frames_of[w.index]
                # its own picker may have one frame fewer than the whole video's count implies: repeat the last
                frames = frames + frames[-1:] * (w.lengths.sync_frames - len(frames))
                with _stage(timings, "sync", self.device):
                    sync_of[w.index] = self._sync_features(frames[: w.lengths.sync_frames])
        clip_all = torch.cat(clip_parts)[: int(CLIP_FPS * duration)] if clip_parts else None
        return duration, clip_all, sync_of

    def _window_batches(self, windows: Sequence[Window]) -> Iterator[list[Window]]:
        """Runs of consecutive equal-length windows, at most ``window_batch`` each."""
        batch: list[Window] = []
        for w in windows:
            if batch and (w.lengths != batch[0].lengths or len(batch) == self.window_batch):
                yield batch
                batch = []
            batch.append(w)
        if batch:
            yield batch

    def sample_windows(
        self, request: GenerationRequest, inputs: WindowInputs, progress: ProgressCallback | None = None
    ) -> list[Tensor]:
        """Final latents of every window, (num_samples, latent_len, D) each, in the pipeline's schedule:
        sequential (each window pinned to the one before it) or batched (even windows at once, unpinned, then
        odd windows at once, pinned to both neighbours)."""
        report = progress or _no_progress
        windows, rows, steps = inputs.windows, request.num_samples, request.num_steps
        sequential = self.window_schedule == "sequential"
        passes = [[w] for w in windows] if sequential else [windows[0::2], windows[1::2]]
        latents: dict[int, Tensor] = {}

        def generated(w: Window) -> list[tuple[Window, Tensor]]:
            return [(windows[j], latents[j]) for j in (w.index - 1, w.index + 1) if j in latents]

        done = 0
        report("sampling", 0.0, StepDetail(1, len(windows), 0, steps))
        for batch in (batch for group in passes for batch in self._window_batches(group)):
            dim = self.audio.latent_dim
            noise = torch.cat(
                [window_noise(request.seed, w.index, rows, w.lengths, dim, self.device, self.dtype) for w in batch]
            )
            pins = make_pins(batch, noise, rows, generated)
            cfg = torch.full((noise.shape[0],), request.cfg_strength)
            on_step = self._window_progress(report, done, len(batch), len(windows), steps)
            out = self.sample(inputs.features(batch, rows, self.dtype), noise, steps, cfg, on_step, pins)
            for k, w in enumerate(batch):
                latents[w.index] = out[k * rows : (k + 1) * rows]
            done += len(batch)
        return [latents[w.index] for w in windows]

    @staticmethod
    def _window_progress(
        report: ProgressCallback, done: int, batch: int, windows: int, steps: int
    ) -> Callable[[int, Tensor, Tensor, Tensor], None]:
        """The step callback of a sampling call over ``batch`` windows after ``done`` others."""

        def on_step(i: int, t: Tensor, x: Tensor, v: Tensor) -> None:
            fraction = (done * steps + batch * (i + 1)) / (windows * steps)
            report("sampling", fraction, StepDetail(done + batch, windows, i + 1, steps))

        return on_step

    def _decode_windows(
        self,
        windows: Sequence[Window],
        latents: Sequence[Tensor],
        rows: int,
        timings: dict[str, float],
        report: ProgressCallback,
    ) -> Iterator[Tensor]:
        """Each window's waveform (rows, samples), in order, decoded ``window_batch`` windows at a time."""
        done = 0
        for batch in self._window_batches(windows):
            with _stage(timings, "vae", self.device):
                x = torch.cat([latents[w.index] for w in batch])
                mel = self.vae.decode(self.flow.unnormalize(x).to(self.decoder_dtype))
            with _stage(timings, "vocoder", self.device):
                waveform = self.vocoder(mel).float().cpu()[:, 0]
            done += len(batch)
            report("decoding", done / len(windows), None)
            yield from waveform.split(rows)

    def _metadata(self, p: PreparedRequest, timings: dict[str, float], batch_size: int) -> dict[str, Any]:
        r = p.request
        has_video = p.frames is not None or p.stream is not None
        mode = "video" if has_video and not p.is_image else "image" if p.is_image else "text"
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
