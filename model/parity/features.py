"""Parity runners for the feature extractors: Synchformer (sync features) and CLIP (image / text features)."""

from __future__ import annotations

import torch

from model.clip import ClipConfig, ClipEncoder
from model.parity.harness import Fixture
from model.synchformer import Synchformer, SynchformerConfig


def upsampled_unit_images(frames_u8: torch.Tensor, factor: int) -> torch.Tensor:
    """Low-res uint8 frames (..., 3, h, w) -> (..., 3, h * factor, w * factor) in [0, 1], as the fixtures define."""
    frames = frames_u8.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    return frames.float() * (1 / 255)


def run_synchformer(fixture: Fixture) -> dict[str, torch.Tensor]:
    config = fixture.config
    video = (upsampled_unit_images(fixture.inputs["frames_u8"], config["upsample"]) - 0.5) / 0.5
    model = Synchformer.from_state_dict(SynchformerConfig(), fixture.weights(), source=fixture.path.name)
    if video.dim() == 6:  # 'segments': (B, S, 16, 3, H, W)
        return {"features": model.encode_segments(video)}
    if video.dim() == 5:  # 'encode_video_with_sync': (B, T, 3, H, W)
        return {"features": model.encode_video(video, chunk_size=config.get("chunk_size"))}
    raise ValueError(f"{fixture.path.name} (case {fixture.data['case']!r}): frames of shape {tuple(video.shape)}")


def run_clip(fixture: Fixture) -> dict[str, torch.Tensor]:
    config = fixture.config
    clip_config = ClipConfig.from_open_clip(config["open_clip_config"], tokenizer=config.get("tokenizer"))
    encoder = ClipEncoder.from_state_dict(clip_config, fixture.weights(), source=fixture.path.name)
    images = upsampled_unit_images(fixture.inputs["frames_u8"], config["upsample"])
    tokens = encoder.tokenize(fixture.inputs["prompts"])
    return {
        "image_features": encoder.encode_images(images, chunk_size=config.get("chunk_size")),
        "tokens": tokens,
        "text_features": encoder.encode_text(tokens),
    }
