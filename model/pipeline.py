"""The whole generation: video, image or nothing + prompts in, waveform out.  Loaded once, generates many.

Stages (each a method, so that the parity harness can record every intermediate):
  prepare  - CPU: decode the video or image into uint8 model frames; fixes the effective duration
  encode   - CLIP image features (8 fps), Synchformer features (25 fps), CLIP text features
  sample   - Euler flow matching with classifier-free guidance from seeded noise
  decode   - latent statistics, VAE decoder to a mel spectrogram, BigVGAN vocoder to a waveform

Requests with the same sequence lengths and step count run as one batch.  Nothing about a request
(its duration in particular) is stored on the modules, so any mix of requests can share one Pipeline.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import open_clip
import torch
from torch import Tensor

from model import weights as official_files
from model.checkpoint import read_state_dict
from model.clip import ClipConfig, ClipEncoder, load_clip
from model.flow import FLOW_CONFIGS, Conditions, FlowNetwork
from model.graphs import GraphedEulerSampler
from model.recipe import synth_module_state_dict
from model.sampler import euler_sample
from model.sequence import (
    AUDIO_16K,
    AUDIO_44K,
    SYNC_SEGMENT,
    SYNC_STEP,
    SYNC_TOKENS_PER_SEGMENT,
    AudioFormat,
    SequenceLengths,
)
from model.synchformer import (
    VISUAL_PREFIX,
    Synchformer,
    SynchformerConfig,
    load_synchformer,
    synchformer_from_state_dict,
)
from model.vae import VAE_CONFIGS, VAEConfig, VAEDecoder, load_vae_decoder
from model.video import VideoInputs, clip_input, load_image, load_video, sync_input
from model.vocoder import VOCODER_CONFIGS, BigVGAN, VocoderConfig, load_vocoder

log = logging.getLogger(__name__)

VARIANTS = tuple(FLOW_CONFIGS)
WeightsKind = Literal["official", "tiny"]
FramePath = Literal["exact", "fast"]
Progress = Callable[[str, float], None]  # (stage, fraction done); raising from it stops the generation

TINY_SEED = 0  # the tiny preset's weights are the recipe's weights for this seed: the same everywhere
TINY_NOTE = "random weights (tiny preset): the audio is a smoke test of the pipeline, not a model prediction"


class Cancelled(Exception):
    """Raised by a progress callback to stop a generation between steps."""


def parameter(default: Any, help_text: str, flag: str | None = None) -> Any:
    """A generation parameter: its default and the help text the CLI shows (``flag``: its option, when not
    the field's name)."""
    return field(default=default, metadata={"help": help_text, "flag": flag})


@dataclass
class GenerationRequest:
    """The parameters of one generation (the one table of them: the CLI's options are made from it, the
    service maps its job parameters onto it by name) and its input, a video, an image or none."""

    prompt: str = parameter("", "what the audio should contain")
    # None: the checkpoint's learned empty-prompt features (no negative prompt)
    negative_prompt: str | None = parameter("", "what it should not contain")
    duration: float = parameter(8.0, "seconds (a shorter video shortens it)")
    num_steps: int = parameter(25, "Euler steps", flag="--steps")
    cfg_strength: float = parameter(4.5, "classifier-free guidance")
    seed: int = parameter(42, "random seed")
    mask_away_clip: bool = parameter(False, "ignore the video's CLIP (semantic) features (keep its sync features)")
    # noise = randn(num_samples, ...) from one generator seeded with `seed`
    num_samples: int = parameter(1, "samples generated together")
    video: Path | None = None
    image: Path | None = None


REQUEST_PARAMETERS = tuple(item for item in fields(GenerationRequest) if "help" in item.metadata)


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


@dataclass(frozen=True)
class Architecture:
    """The configuration of every module of one variant (official sizes, or the tiny preset's)."""

    variant: str
    audio: AudioFormat
    flow: Any  # model.flow.FlowConfig
    clip: ClipConfig
    synchformer: SynchformerConfig
    vae: VAEConfig
    vocoder: VocoderConfig

    @classmethod
    def official(cls, variant: str, vocoder: VocoderConfig | None = None) -> Architecture:
        flow = _flow_config(variant)
        audio = audio_format(variant)
        return cls(
            variant,
            audio,
            flow,
            ClipConfig(),
            SynchformerConfig(),
            VAE_CONFIGS[audio.name],
            vocoder or VOCODER_CONFIGS[audio.name],
        )

    @classmethod
    def tiny(cls, variant: str) -> Architecture:
        official = cls.official(variant)
        clip, synchformer = ClipConfig.tiny(), SynchformerConfig.tiny()
        text_dim = clip.model_cfg["text_cfg"]["width"]
        flow = official.flow.tiny(clip_dim=clip.model_cfg["embed_dim"], sync_dim=synchformer.dim, text_dim=text_dim)
        return cls(variant, official.audio, flow, clip, synchformer, official.vae.tiny(), official.vocoder.tiny())


def _flow_config(variant: str):
    if variant not in FLOW_CONFIGS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    return FLOW_CONFIGS[variant]


def audio_format(variant: str) -> AudioFormat:
    return AUDIO_16K if _flow_config(variant).latent_dim == AUDIO_16K.latent_dim else AUDIO_44K


# ---------------------------------------------------------------------------------------------
# module construction


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _default_dtype(device: str) -> torch.dtype:
    # the official demo runs bf16 on accelerators; fp32 on CPU (bf16 matmuls there are slow and inexact)
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


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

    @property
    def weights_kind(self) -> WeightsKind:
        return self.weights_info["kind"]

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        variant: str = "large_44k_v2",
        weights: WeightsKind = "official",
        weights_dir: str | Path = "weights",
        device: str | None = None,
        dtype: torch.dtype | None = None,
        frame_path: FramePath = "exact",
        cuda_graphs: bool = True,
    ) -> Pipeline:
        """Official weights from ``weights_dir`` (model.weights lays them out), or the ``tiny`` random preset."""
        device = device or _default_device()
        dtype = dtype or _default_dtype(device)
        if weights == "tiny":
            return cls.tiny(variant, device=device, dtype=dtype, frame_path=frame_path, cuda_graphs=cuda_graphs)
        if weights != "official":
            raise ValueError(f"weights must be 'official' or 'tiny', not {weights!r}")
        _flow_config(variant)
        official_files.verify(variant, weights_dir, check_md5=False).raise_for_problems()
        paths = official_files.paths_for(variant, weights_dir)
        vocoder = None
        if paths.vocoder_config is not None:  # BigVGAN-v2 ships its hyper-parameters; the 16k one is built in
            vocoder = VocoderConfig.from_bigvgan_json(json.loads(paths.vocoder_config.read_text()))
        arch = replace(
            Architecture.official(variant, vocoder),
            clip=ClipConfig.from_open_clip(json.loads(paths.clip_config.read_text())),
        )
        manifest = official_files.official_manifest()
        flow_file = manifest.files[manifest.variants[variant]["flow"]]
        # the published md5 of the flow checkpoint names the weights (verify() checks the files against it)
        info = {"kind": "official", "random_weights": False, "id": f"{flow_file.file}:{flow_file.md5}"}
        return cls.from_files(
            arch, paths, info, device=device, dtype=dtype, frame_path=frame_path, cuda_graphs=cuda_graphs
        )

    @classmethod
    def from_files(
        cls, architecture: Architecture, paths: official_files.VariantPaths, weights_info: Mapping[str, Any], **kwargs
    ) -> Pipeline:
        """Load every checkpoint file in its official format (key names, containers, extra keys)."""
        arch = architecture
        return cls(
            arch,
            FlowNetwork.from_state_dict(arch.flow, read_state_dict(paths.flow), source=str(paths.flow)),
            load_clip(paths.clip.parent, arch.clip),
            load_synchformer(paths.synchformer, arch.synchformer),
            load_vae_decoder(paths.vae, arch.vae),
            load_vocoder(paths.vocoder, arch.vocoder),
            {**weights_info, "files": [p.name for p in (paths.flow, paths.vae, paths.vocoder, paths.synchformer)]},
            **kwargs,
        )

    @classmethod
    def from_state_dicts(
        cls,
        architecture: Architecture,
        state_dicts: Mapping[str, Mapping[str, Tensor]],
        weights_info: Mapping[str, Any],
        **kwargs: Any,
    ) -> Pipeline:
        """Build from in-memory state dicts in the official files' formats.

        Keys of ``state_dicts``: flow, clip, synchformer (the whole Synchformer state dict), vae (the whole
        VAE, encoder keys allowed), vocoder (the generator state dict).  Every one goes through the same
        loaders as the official files, so the tiny preset and the parity fixtures test them too.
        """
        arch = architecture
        flow = FlowNetwork.from_state_dict(arch.flow, state_dicts["flow"])
        clip = ClipEncoder.from_state_dict(state_dicts["clip"], arch.clip)
        synchformer = synchformer_from_state_dict(state_dicts["synchformer"], arch.synchformer)
        vae = VAEDecoder(arch.vae)
        vae.load_official(state_dicts["vae"])
        vocoder = BigVGAN(arch.vocoder)
        vocoder.load_official(state_dicts["vocoder"])
        return cls(arch, flow, clip, synchformer, vae, vocoder, weights_info, **kwargs)

    @classmethod
    def tiny(cls, variant: str = "large_44k_v2", seed: int = TINY_SEED, **kwargs: Any) -> Pipeline:
        """The official code paths at tiny sizes with deterministic random weights (tests, offline demos)."""
        arch = Architecture.tiny(variant)
        with torch.device("meta"):
            flow_skeleton = FlowNetwork(arch.flow)
            clip_skeleton = open_clip.CLIP(**arch.clip.model_cfg)
        synchformer = Synchformer(arch.synchformer)
        state_dicts = {
            "flow": synth_module_state_dict(flow_skeleton, seed),
            "clip": synth_module_state_dict(clip_skeleton, seed),
            "synchformer": {VISUAL_PREFIX + k: v for k, v in synth_module_state_dict(synchformer, seed).items()},
            "vae": synth_module_state_dict(VAEDecoder(arch.vae), seed),
            "vocoder": synth_module_state_dict(BigVGAN(arch.vocoder), seed),
        }
        info = {"kind": "tiny", "random_weights": True, "id": f"tiny-{variant}-seed{seed}", "note": TINY_NOTE}
        return cls.from_state_dicts(arch, state_dicts, info, **kwargs)

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
            frames = load_video(request.video, request.duration, frame_path=self.frame_path)
            duration = frames.duration_sec
        elif request.image is not None:
            frames = load_image(request.image, request.duration)
        lengths = SequenceLengths.for_duration(duration, self.audio)
        if lengths.clip < 1 or lengths.sync < 1:
            raise ValueError(f"duration {duration:.3f} s is too short: at least {16 / 25:.2f} s of video is needed")
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

    def generate(self, request: GenerationRequest, progress: Progress | None = None) -> GenerationResult:
        return self.generate_batch([request], progress)[0]

    def generate_batch(
        self, requests: Sequence[GenerationRequest], progress: Progress | None = None
    ) -> list[GenerationResult]:
        """Results in request order; requests with equal lengths and step counts share one batched pass."""
        report = progress or (lambda stage, fraction: None)
        prepared = []
        for i, request in enumerate(requests):
            prepared.append(self.prepare(request))
            report("video", (i + 1) / len(requests))
        return self.generate_prepared(prepared, report)

    @torch.inference_mode()
    def generate_prepared(
        self, prepared: Sequence[PreparedRequest], progress: Progress | None = None
    ) -> list[GenerationResult]:
        """The GPU part for requests already prepared (a worker decodes the next jobs while this runs)."""
        report = progress or (lambda stage, fraction: None)
        start = time.perf_counter()
        groups: dict[tuple[SequenceLengths, int], list[int]] = {}
        for i, p in enumerate(prepared):
            groups.setdefault(p.batch_key, []).append(i)
        results: list[GenerationResult | None] = [None] * len(prepared)
        for indices in groups.values():
            batch = [prepared[i] for i in indices]
            for i, result in zip(indices, self._generate_group(batch, report), strict=True):
                results[i] = result
        elapsed = time.perf_counter() - start
        for p, result in zip(prepared, results, strict=True):
            result.metadata["timings"]["total"] = p.decode_seconds + elapsed
        return results

    def _generate_group(self, batch: Sequence[PreparedRequest], report: Progress) -> list[GenerationResult]:
        num_steps = batch[0].request.num_steps
        report("features", 0.0)
        features = self.encode(batch)
        timings = dict(features.timings)
        report("features", 1.0)
        with _stage(timings, "sampling", self.device):
            x0 = self.initial_noise(batch)
            cfg = torch.tensor([p.request.cfg_strength for p in batch for _ in range(p.request.num_samples)])
            report("sampling", 0.0)
            latents = self.sample(
                features, x0, num_steps, cfg, lambda i, t, x, v: report("sampling", (i + 1) / num_steps)
            )
        report("decoding", 0.0)
        with _stage(timings, "vae", self.device):
            mel = self.vae.decode(self.flow.unnormalize(latents).to(self.decoder_dtype))
        with _stage(timings, "vocoder", self.device):
            waveform = self.vocoder(mel).float().cpu()[:, 0]
        report("decoding", 1.0)

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


def validate(request: GenerationRequest) -> None:
    """Reject requests the model cannot run (the service checks its own, tighter limits first)."""
    if not request.duration > 0:
        raise ValueError(f"duration must be positive, got {request.duration}")
    if request.num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {request.num_steps}")
    if request.num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {request.num_samples}")
