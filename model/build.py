"""Building a Pipeline: the architecture of each variant, and its weights (official files, state dicts or the
tiny preset's deterministic random ones).  model.pipeline runs what is built here.

Every component is made by one idiom, ``Component.from_state_dict(config, state_dict)`` (``from_file`` for an
official checkpoint file), so the tiny preset and the parity fixtures exercise the official loaders too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import open_clip
import torch
from torch import Tensor

from model.clip import ClipConfig, ClipEncoder
from model.flow import FLOW_CONFIGS, FlowConfig, FlowNetwork
from model.frame_path import FramePath
from model.pipeline import Pipeline
from model.recipe import synth_module_state_dict
from model.sequence import AUDIO_16K, AUDIO_44K, AudioFormat
from model.synchformer import VISUAL_PREFIX, Synchformer, SynchformerConfig
from model.vae import VAE_CONFIGS, VAEConfig, VAEDecoder
from model.vocoder import VOCODER_CONFIGS, BigVGAN, VocoderConfig
from model.weights.manifest import VariantPaths, official_manifest, paths_for
from model.weights.verification import verify

VARIANTS = tuple(FLOW_CONFIGS)
WeightsKind = Literal["official", "tiny"]

TINY_SEED = 0  # the tiny preset's weights are the recipe's weights for this seed: the same everywhere
TINY_NOTE = "random weights (tiny preset): the audio is a smoke test of the pipeline, not a model prediction"


@dataclass(frozen=True)
class Architecture:
    """The configuration of every module of one variant (official sizes, or the tiny preset's)."""

    variant: str
    audio: AudioFormat
    flow: FlowConfig
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


def _flow_config(variant: str) -> FlowConfig:
    if variant not in FLOW_CONFIGS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    return FLOW_CONFIGS[variant]


def audio_format(variant: str) -> AudioFormat:
    return AUDIO_16K if _flow_config(variant).latent_dim == AUDIO_16K.latent_dim else AUDIO_44K


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    # the official demo runs bf16 on accelerators; fp32 on CPU (bf16 matmuls there are slow and inexact)
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def load_pipeline(
    variant: str = "large_44k_v2",
    weights: WeightsKind = "official",
    weights_dir: str | Path = "weights",
    device: str | None = None,
    dtype: torch.dtype | None = None,
    frame_path: FramePath = "exact",
    cuda_graphs: bool = True,
    **options: Any,
) -> Pipeline:
    """Official weights from ``weights_dir`` (model.weights lays them out), or the ``tiny`` random preset.

    ``options``: further Pipeline arguments: how requests longer than 8 s are windowed (window_overlap,
    window_schedule, window_batch: model.windows), the encoders' chunk (encoder_chunk) and the speed options
    (compile_modules, compile_mode, cudnn_benchmark).
    """
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    options = {"device": device, "dtype": dtype, "frame_path": frame_path, "cuda_graphs": cuda_graphs, **options}
    if weights == "tiny":
        return tiny_pipeline(variant, **options)
    if weights != "official":
        raise ValueError(f"weights must be 'official' or 'tiny', not {weights!r}")
    _flow_config(variant)
    verify(variant, weights_dir, check_md5=False).raise_for_problems()
    paths = paths_for(variant, weights_dir)
    vocoder = None
    if paths.vocoder_config is not None:  # BigVGAN-v2 ships its hyper-parameters; the 16k one is built in
        vocoder = VocoderConfig.from_bigvgan_json(json.loads(paths.vocoder_config.read_text()))
    arch = replace(
        Architecture.official(variant, vocoder),
        clip=ClipConfig.from_open_clip(json.loads(paths.clip_config.read_text())),
    )
    manifest = official_manifest()
    flow_file = manifest.files[manifest.variants[variant]["flow"]]
    # the published md5 of the flow checkpoint names the weights (verify() checks the files against it)
    info = {"kind": "official", "random_weights": False, "id": f"{flow_file.file}:{flow_file.md5}"}
    return pipeline_from_files(arch, paths, info, **options)


def pipeline_from_files(
    architecture: Architecture, paths: VariantPaths, weights_info: Mapping[str, Any], **kwargs: Any
) -> Pipeline:
    """Load every checkpoint file in its official format (key names, containers, extra keys)."""
    arch = architecture
    return Pipeline(
        arch,
        FlowNetwork.from_file(arch.flow, paths.flow),
        ClipEncoder.from_file(arch.clip, paths.clip),
        Synchformer.from_file(arch.synchformer, paths.synchformer),
        VAEDecoder.from_file(arch.vae, paths.vae),
        BigVGAN.from_file(arch.vocoder, paths.vocoder),
        {**weights_info, "files": [p.name for p in (paths.flow, paths.vae, paths.vocoder, paths.synchformer)]},
        **kwargs,
    )


def pipeline_from_state_dicts(
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
    return Pipeline(
        arch,
        FlowNetwork.from_state_dict(arch.flow, state_dicts["flow"]),
        ClipEncoder.from_state_dict(arch.clip, state_dicts["clip"]),
        Synchformer.from_state_dict(arch.synchformer, state_dicts["synchformer"]),
        VAEDecoder.from_state_dict(arch.vae, state_dicts["vae"]),
        BigVGAN.from_state_dict(arch.vocoder, state_dicts["vocoder"]),
        weights_info,
        **kwargs,
    )


def tiny_pipeline(variant: str = "large_44k_v2", seed: int = TINY_SEED, **kwargs: Any) -> Pipeline:
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
    return pipeline_from_state_dicts(arch, state_dicts, info, **kwargs)
