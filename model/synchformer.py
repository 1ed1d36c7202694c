"""Synchformer's visual encoder (MotionFormer): 25 fps video -> 8 feature tokens per 16-frame segment.

A ViT over space-time tubelets (2 frames x 16 x 16 pixels) with divided attention: every block first
attends over time (tokens at the same spatial position), then over space (tokens of the same time
step), with a CLS token that sees everything.  Afterwards each time step's 196 patch tokens are
pooled by a one-layer transformer with its own CLS token, leaving 8 tokens of 768 per segment.

Only the visual branch of the official Synchformer checkpoint is used (``vfeat_extractor.*``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from model.checkpoint import Loadable, load_checked
from model.sequence import SYNC_SEGMENT, SYNC_STEP

logger = logging.getLogger(__name__)

# The official file holds the whole audio-visual sync model; only this branch encodes video.
VISUAL_PREFIX = "vfeat_extractor."
# A 2-D patch embedding left over from MotionFormer's image pre-training: stored, never applied.
UNUSED_PREFIXES = ("patch_embed.proj.",)


@dataclass(frozen=True)
class SynchformerConfig:
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: int = 4
    patch_size: int = 16  # pixels per tubelet side
    patch_frames: int = 2  # frames per tubelet
    image_size: int = 224
    segment_frames: int = SYNC_SEGMENT
    segment_step: int = SYNC_STEP
    norm_eps: float = 1e-6

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def patches_per_step(self) -> int:
        return self.grid**2

    @property
    def time_steps(self) -> int:
        """Feature tokens per segment."""
        return self.segment_frames // self.patch_frames

    @classmethod
    def tiny(cls) -> SynchformerConfig:
        """Same patching and segmenting as the official model, small widths: for fast tests."""
        return replace(cls(), dim=64, depth=2, heads=2)


class DividedAttention(nn.Module):
    """Self-attention within groups of patch tokens (same position or same time step) plus a global CLS."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, time_steps: int, over: Literal["time", "space"]) -> torch.Tensor:
        b, length, dim = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)

        # The CLS query attends to every token, itself included.
        cls_out = F.scaled_dot_product_attention(q[:, :, :1], k, v)

        # Patch tokens are time-major.  Regroup them as (b, h, group, member, d): members are the tokens one
        # group attends over (the time steps of a position, or the positions of a time step).
        def groups(t: torch.Tensor) -> torch.Tensor:
            t = t[:, :, 1:].unflatten(2, (time_steps, -1))  # (b, h, time, position, d)
            return t.transpose(2, 3) if over == "time" else t

        q_patch, k_patch, v_patch = groups(q), groups(k), groups(v)
        group_shape = q_patch.shape
        # every group also sees the CLS token as its first key / value
        k_patch = torch.cat([k[:, :, None, :1].expand(-1, -1, group_shape[2], -1, -1), k_patch], dim=3)
        v_patch = torch.cat([v[:, :, None, :1].expand(-1, -1, group_shape[2], -1, -1), v_patch], dim=3)
        patch_out = F.scaled_dot_product_attention(
            q_patch.flatten(1, 2), k_patch.flatten(1, 2), v_patch.flatten(1, 2)
        ).view(group_shape)
        if over == "time":
            patch_out = patch_out.transpose(2, 3)

        out = torch.cat([cls_out, patch_out.flatten(2, 3)], dim=2)  # (b, h, length, d)
        return self.proj(out.transpose(1, 2).reshape(b, length, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class DividedSpaceTimeBlock(nn.Module):
    # Attribute names follow the checkpoint: ``attn`` is the space attention, ``norm3`` feeds the time attention.
    def __init__(self, config: SynchformerConfig) -> None:
        super().__init__()
        dim = config.dim
        self.norm3 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.timeattn = DividedAttention(dim, config.heads)
        self.norm1 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.attn = DividedAttention(dim, config.heads)
        self.norm2 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.mlp = Mlp(dim, config.mlp_ratio * dim)

    def forward(self, x: torch.Tensor, time_steps: int) -> torch.Tensor:
        x = x + self.timeattn(self.norm3(x), time_steps, over="time")
        x = x + self.attn(self.norm1(x), time_steps, over="space")
        return x + self.mlp(self.norm2(x))


class TubeletEmbed(nn.Module):
    def __init__(self, config: SynchformerConfig) -> None:
        super().__init__()
        kernel = (config.patch_frames, config.patch_size, config.patch_size)
        self.proj = nn.Conv3d(3, config.dim, kernel_size=kernel, stride=kernel)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """(N, C, T, H, W) -> (N, time * positions, dim), time-major."""
        return self.proj(video).flatten(2).transpose(1, 2)


class SpatialPool(nn.Module):
    """Pre-norm transformer encoder layer over [CLS, patches] of one time step; returns the CLS output.

    Parameter names are those of ``nn.TransformerEncoderLayer``, which the checkpoint was saved from.
    """

    def __init__(self, config: SynchformerConfig) -> None:
        super().__init__()
        dim = config.dim
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
        self.norm1 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.self_attn = nn.MultiheadAttention(dim, config.heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.linear1 = nn.Linear(dim, config.mlp_ratio * dim)
        self.linear2 = nn.Linear(config.mlp_ratio * dim, dim)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1)
        h = self.norm1(x)
        # Only the CLS row is kept, and every op after attention is row-wise: compute that row alone.
        cls = x[:, :1] + self.self_attn(h[:, :1], h, h, need_weights=False)[0]
        cls = cls + self.linear2(F.gelu(self.linear1(self.norm2(cls))))
        return cls[:, 0]


class Synchformer(Loadable, nn.Module):
    def __init__(self, config: SynchformerConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.dim
        self.patch_embed_3d = TubeletEmbed(config)
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.empty(1, 1 + config.patches_per_step, dim))  # CLS + positions
        self.temp_embed = nn.Parameter(torch.empty(1, config.time_steps, dim))
        self.blocks = nn.ModuleList(DividedSpaceTimeBlock(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(dim, eps=config.norm_eps)
        self.spatial_attn_agg = SpatialPool(config)

    @classmethod
    def from_state_dict(
        cls, config: SynchformerConfig, state_dict: Mapping[str, torch.Tensor], source: str = "Synchformer checkpoint"
    ) -> Synchformer:
        """A Synchformer (eval mode) from a full official state dict (keys ``vfeat_extractor.*`` are used)."""
        model = cls(config)
        load_checked(model, visual_state_dict(state_dict), source, ignore_prefixes=UNUSED_PREFIXES)
        return model.eval()

    def forward(self, segments: torch.Tensor) -> torch.Tensor:
        """(N, segment_frames, 3, H, W) in [-1, 1] -> (N, time_steps, dim)."""
        cfg = self.config
        n = segments.shape[0]
        x = self.patch_embed_3d(segments.transpose(1, 2))

        # position = spatial embedding of the patch + temporal embedding of its time step
        pos = self.pos_embed[:, 1:, None] + self.temp_embed[:, None]  # (1, positions, time, dim)
        x = x + pos.transpose(1, 2).flatten(1, 2)
        cls = self.cls_token + self.pos_embed[:, :1]
        x = torch.cat([cls.expand(n, -1, -1), x], dim=1)

        for block in self.blocks:
            x = block(x, cfg.time_steps)

        x = self.norm(x[:, 1:])
        x = self.spatial_attn_agg(x.reshape(n * cfg.time_steps, cfg.patches_per_step, cfg.dim))
        return x.view(n, cfg.time_steps, cfg.dim)

    def _check_frames(self, frames: torch.Tensor) -> None:
        size = self.config.image_size
        if frames.shape[-3:] != (3, size, size):
            raise ValueError(f"Synchformer wants frames of shape (3, {size}, {size}), got {tuple(frames.shape)}")

    @torch.inference_mode()
    def encode_segments(self, segments: torch.Tensor) -> torch.Tensor:
        """(B, S, segment_frames, 3, H, W) -> (B, S, time_steps, dim)."""
        self._check_frames(segments)
        b, s = segments.shape[:2]
        weight = self.pos_embed
        out = self(segments.flatten(0, 1).to(weight.device, weight.dtype))
        return out.unflatten(0, (b, s))

    @torch.inference_mode()
    def encode_video(self, video: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """(B, T, 3, H, W) in [-1, 1] at 25 fps -> (B, S * time_steps, dim), S = (T - 16) // 8 + 1.

        Segments are windows of 16 frames every 8 frames; frames after the last full window are dropped.
        All B * S segments run as one batch, or ``chunk_size`` segments at a time to bound memory.
        """
        cfg = self.config
        self._check_frames(video)
        b, frames = video.shape[:2]
        if frames < cfg.segment_frames:
            raise ValueError(f"Synchformer needs at least {cfg.segment_frames} frames, got {frames}")
        weight = self.pos_embed
        video = video.to(weight.device, weight.dtype)
        # (B, S, 3, H, W, segment_frames) view -> (B * S, segment_frames, 3, H, W)
        windows = video.unfold(1, cfg.segment_frames, cfg.segment_step)
        segments = windows.movedim(-1, 2).flatten(0, 1)
        chunk = chunk_size or segments.shape[0]
        return torch.cat([self(part) for part in segments.split(chunk)]).view(b, -1, cfg.dim)


def visual_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The visual-branch entries of a full Synchformer state dict, with the branch prefix removed."""
    visual = {k.removeprefix(VISUAL_PREFIX): v for k, v in state_dict.items() if k.startswith(VISUAL_PREFIX)}
    logger.debug(
        "Synchformer checkpoint: using %d %s* keys, ignoring %d others (audio branch, sync head)",
        len(visual),
        VISUAL_PREFIX,
        len(state_dict) - len(visual),
    )
    return visual
