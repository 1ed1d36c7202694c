"""The MMAudio flow network: a multimodal DiT that predicts the flow of audio latents given video and text.

Three token streams (audio latents, CLIP frames, text tokens) attend jointly in the first blocks; the
remaining "fused" blocks refine the latents alone.  Every block is modulated (adaLN) by a global vector
(time + pooled CLIP + pooled text); the latent stream additionally gets the Synchformer features per
token.  Parameter names follow the official checkpoints so that they load strictly.

Sequence lengths are not model state: they come from the shapes of the tensors of each call, and the
RoPE tables derived from them live in a cache keyed by everything they depend on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.checkpoint import Loadable, load_checked
from model.sequence import SYNC_TOKENS_PER_SEGMENT

# Convolution widths of the official architecture (shared by every variant).
WIDE_KERNEL = 7  # audio input projection, sync input conv, final layer
NARROW_KERNEL = 3  # clip / sync input feed-forwards and all in-block projections of latent and clip streams
SWIGLU_MULTIPLE = 256  # SwiGLU hidden widths are rounded up to a multiple of this

# Buffers that official checkpoints may carry although they are derived, not learned.
NON_PERSISTENT_KEYS = ("t_embed.freqs", "latent_rot", "clip_rot")


@dataclass(frozen=True)
class FlowConfig:
    latent_dim: int
    num_heads: int
    depth: int  # joint + fused blocks
    fused_depth: int  # latent-only blocks at the end
    v2: bool = False  # large_44k_v2: SiLU input projections and a wider, period-1 time embedding
    head_dim: int = 64
    clip_dim: int = 1024
    sync_dim: int = 768
    text_dim: int = 1024
    text_seq_len: int = 77
    mlp_ratio: float = 4.0
    rope_theta: float = 10000.0

    @property
    def hidden_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def joint_depth(self) -> int:
        return self.depth - self.fused_depth

    @property
    def time_frequency_dim(self) -> int:
        return self.hidden_dim if self.v2 else 256  # v1: DiT's 256 sinusoids

    @property
    def time_max_period(self) -> float:
        return 1.0 if self.v2 else 10000.0

    def tiny(self, clip_dim: int, sync_dim: int, text_dim: int) -> FlowConfig:
        """Same code paths at toy size, for feature extractors of the given widths (offline preset)."""
        return replace(
            self, num_heads=2, depth=3, fused_depth=2, clip_dim=clip_dim, sync_dim=sync_dim, text_dim=text_dim
        )


FLOW_CONFIGS: dict[str, FlowConfig] = {
    "small_16k": FlowConfig(latent_dim=20, num_heads=7, depth=12, fused_depth=8),
    "small_44k": FlowConfig(latent_dim=40, num_heads=7, depth=12, fused_depth=8),
    "medium_44k": FlowConfig(latent_dim=40, num_heads=14, depth=12, fused_depth=8),
    "large_44k": FlowConfig(latent_dim=40, num_heads=14, depth=21, fused_depth=14),
    "large_44k_v2": FlowConfig(latent_dim=40, num_heads=14, depth=21, fused_depth=14, v2=True),
}


# ---------------------------------------------------------------------------------------------
# layers


class ChannelLastConv1d(nn.Conv1d):
    """A 'same'-padded Conv1d over (batch, time, channels) tensors."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int, bias: bool = True) -> None:
        super().__init__(in_dim, out_dim, kernel_size, padding=kernel_size // 2, bias=bias)
        # Same shape, but laid out (out, kernel, in) in memory, like the activations: cuDNN's channel-last kernels
        # then take both as they are instead of converting weight and input layouts at every call (on an H100
        # those conversions took over half of the GPU time of a sampling step).  Loading copies values in.
        self.weight = nn.Parameter(self.weight.new_empty(out_dim, kernel_size, in_dim).transpose(1, 2))

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


def token_projection(in_dim: int, out_dim: int, kernel_size: int | None, bias: bool = True) -> nn.Module:
    """Per-token Linear (kernel_size None) or a channel-last convolution over time."""
    if kernel_size is None:
        return nn.Linear(in_dim, out_dim, bias=bias)
    return ChannelLastConv1d(in_dim, out_dim, kernel_size, bias=bias)


class SwiGLU(nn.Module):
    """Bias-free gated feed-forward w2(silu(w1 x) * w3 x); Linear or convolutional (kernel_size).

    w1 and w3 run as one projection ``w13`` of twice the width (one GEMM instead of two over the same input).
    The state dict keeps the official keys w1.weight and w3.weight: they are the two halves of w13.weight.
    """

    def __init__(self, dim: int, expanded_dim: int, kernel_size: int | None = None) -> None:
        super().__init__()
        self.hidden = SWIGLU_MULTIPLE * math.ceil(int(2 * expanded_dim / 3) / SWIGLU_MULTIPLE)
        self.w13 = token_projection(dim, 2 * self.hidden, kernel_size, bias=False)
        self.w2 = token_projection(self.hidden, dim, kernel_size, bias=False)
        self.register_state_dict_post_hook(_split_w13)
        self.register_load_state_dict_pre_hook(_merge_w13)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * value)


def _split_w13(module: nn.Module, state_dict: dict[str, Tensor], prefix: str, local_metadata: object) -> None:
    w1, w3 = state_dict.pop(prefix + "w13.weight").chunk(2, dim=0)
    state_dict[prefix + "w1.weight"], state_dict[prefix + "w3.weight"] = w1, w3


def _merge_w13(module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *_: object) -> None:
    if prefix + "w1.weight" in state_dict and prefix + "w3.weight" in state_dict:
        w1, w3 = state_dict.pop(prefix + "w1.weight"), state_dict.pop(prefix + "w3.weight")
        state_dict[prefix + "w13.weight"] = torch.cat([w1, w3], dim=0)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate consecutive channel pairs (x[2i], x[2i+1]) of (B, H, N, head_dim) by the angles of the (2, N, head_dim)
    table: (cos x0 - sin x1, sin x0 + cos x1), in float32 at least.

    Real-valued (x * cos + swapped pairs * signed sin) rather than a complex product, so that a compiler fuses
    it with the norms around it (inductor has no complex kernels); the same products and sums as the complex one.
    """
    cos, signed_sin = rope
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0) per pair
    return (xf * cos + swapped * signed_sin).to(x.dtype)


def rope_table(length: int, scaling: float, head_dim: int, theta: float, device: torch.device) -> Tensor:
    """(cos, signed sin) of angle(pos, k) = pos * scaling / theta^(2k / head_dim), float32 of shape
    (2, length, head_dim): cos repeated for both channels of a pair, sin negated for the first one."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    angles = torch.arange(length, dtype=torch.float32, device=device)[:, None] * (freqs * scaling)
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([torch.stack([cos, cos], -1), torch.stack([-sin, sin], -1)]).flatten(-2)


def joint_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """SDPA over (B, H, N, head_dim) -> (B, N, H * head_dim)."""
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


T = TypeVar("T")


class DerivedTables:
    """Constants derived from sizes (RoPE rotations, time frequencies, sync token map), keyed by what they depend on.

    Kept out of the state dict so that .to(bfloat16) cannot round them (they stay float32) and so
    that a request's sequence lengths never become model state.  Built outside inference mode so that a table
    made while serving stays usable in any later autograd mode.
    """

    def __init__(self) -> None:
        self._tables: dict[tuple, object] = {}

    def get(self, key: tuple, make: Callable[[], T]) -> T:
        if key not in self._tables:
            with torch.inference_mode(False), torch.no_grad():
                self._tables[key] = make()
        return self._tables[key]  # type: ignore[return-value]


class QKV(nn.Module):
    """Fused q/k/v projection (output channels interleaved as (head, head_dim, q|k|v)) with per-head RMSNorm."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        head_dim = dim // num_heads
        self.q_norm = nn.RMSNorm(head_dim)  # eps None: machine eps of the activation dtype, as upstream
        self.k_norm = nn.RMSNorm(head_dim)

    def forward(self, x: Tensor, rope: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        qkv = self.qkv(x).unflatten(-1, (self.num_heads, -1, 3))  # (B, N, H, head_dim, 3)
        q, k, v = qkv.permute(4, 0, 2, 1, 3).unbind(0)  # each (B, H, N, head_dim)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return q, k, v.contiguous()


class StreamBlock(nn.Module):
    """One token stream of a DiT block: modulated attention inputs, then gated attention output and feed-forward.

    ``pre_only`` streams (clip and text in the last joint block) only contribute keys and values.
    ``kernel_size`` None makes the in-block projections per-token Linears (text stream).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, kernel_size: int | None, pre_only: bool = False):
        super().__init__()
        self.pre_only = pre_only
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = QKV(dim, num_heads)
        if not pre_only:
            self.linear1 = token_projection(dim, dim, kernel_size)
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
            self.ffn = SwiGLU(dim, int(dim * mlp_ratio), kernel_size)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, (2 if pre_only else 6) * dim))

    def attention_inputs(
        self, x: Tensor, c: Tensor, rope: Tensor | None
    ) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, ...]]:
        """(q, k, v) and the modulation left for ``finish`` (gate_msa, shift_mlp, scale_mlp, gate_mlp)."""
        shift_msa, scale_msa, *rest = self.adaLN_modulation(c).chunk(2 if self.pre_only else 6, dim=-1)
        return self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope), tuple(rest)

    def finish(self, x: Tensor, attn_out: Tensor, modulation: tuple[Tensor, ...]) -> Tensor:
        gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        x = x + self.linear1(attn_out) * gate_msa
        return x + self.ffn(modulate(self.norm2(x), shift_mlp, scale_mlp)) * gate_mlp

    def forward(self, x: Tensor, c: Tensor, rope: Tensor | None) -> Tensor:
        """The block on its own stream (fused blocks)."""
        qkv, modulation = self.attention_inputs(x, c, rope)
        return self.finish(x, joint_attention(*qkv), modulation)


class JointBlock(nn.Module):
    """Latent, clip and text streams attending over their concatenation [latent; clip; text]."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, pre_only: bool) -> None:
        super().__init__()
        self.pre_only = pre_only
        self.latent_block = StreamBlock(dim, num_heads, mlp_ratio, NARROW_KERNEL)
        self.clip_block = StreamBlock(dim, num_heads, mlp_ratio, NARROW_KERNEL, pre_only)
        self.text_block = StreamBlock(dim, num_heads, mlp_ratio, None, pre_only)

    def forward(
        self,
        latent: Tensor,
        clip: Tensor,
        text: Tensor,
        global_c: Tensor,
        extended_c: Tensor,
        latent_rope: Tensor,
        clip_rope: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        latent_qkv, latent_mod = self.latent_block.attention_inputs(latent, extended_c, latent_rope)
        clip_qkv, clip_mod = self.clip_block.attention_inputs(clip, global_c, clip_rope)
        text_qkv, text_mod = self.text_block.attention_inputs(text, global_c, None)
        joint = [torch.cat(parts, dim=2) for parts in zip(latent_qkv, clip_qkv, text_qkv, strict=True)]
        latent_out, clip_out, text_out = joint_attention(*joint).split(
            [latent.shape[1], clip.shape[1], text.shape[1]], dim=1
        )
        latent = self.latent_block.finish(latent, latent_out, latent_mod)
        if not self.pre_only:
            clip = self.clip_block.finish(clip, clip_out, clip_mod)
            text = self.text_block.finish(text, text_out, text_mod)
        return latent, clip, text


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.conv = ChannelLastConv1d(dim, out_dim, WIDE_KERNEL)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.conv(modulate(self.norm(x), shift, scale))


class TimestepEmbedding(nn.Module):
    """[cos(t f), sin(t f)] with f_i = (10000 / max_period) * 10000^(-2i / F), then an MLP to the hidden width."""

    def __init__(self, dim: int, frequency_dim: int, max_period: float) -> None:
        super().__init__()
        self.frequency_dim, self.max_period = frequency_dim, max_period
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.tables = DerivedTables()

    def _frequencies(self, device: torch.device) -> Tensor:
        exponents = torch.arange(0, self.frequency_dim, 2, dtype=torch.float32, device=device) / self.frequency_dim
        return (10000 / self.max_period) * (1.0 / (10000**exponents))

    def forward(self, t: Tensor) -> Tensor:
        freqs = self.tables.get(("freqs", t.device), lambda: self._frequencies(t.device))
        angles = t.float()[:, None] * freqs
        embedding = torch.cat([angles.cos(), angles.sin()], dim=-1)
        return self.mlp(embedding.to(self.mlp[0].weight.dtype))


# ---------------------------------------------------------------------------------------------
# the network


@dataclass
class Conditions:
    """A request's conditions after the input projections: computed once, reused at every step.

    clip_f (B, clip_len, D), sync_f (B, latent_len, D) already resized to the latents, text_f (B, text_len, D),
    clip_f_c / text_f_c (B, D) pooled summaries.  Fields may be broadcast views (empty conditions).
    """

    clip_f: Tensor
    sync_f: Tensor
    text_f: Tensor
    clip_f_c: Tensor
    text_f_c: Tensor

    def cat(self, other: Conditions) -> Conditions:
        """Both batches in one (for evaluating conditional and unconditional flows together)."""
        return Conditions(*(torch.cat([getattr(self, f.name), getattr(other, f.name)]) for f in fields(self)))


def input_projection(first: nn.Module, activation: nn.Module | None, feed_forward: nn.Module) -> nn.Sequential:
    # Sequential indices are part of the checkpoint keys: v1 clip/text projections have no activation slot.
    return nn.Sequential(*(m for m in (first, activation, feed_forward) if m is not None))


class FlowNetwork(Loadable, nn.Module):
    def __init__(self, config: FlowConfig) -> None:
        super().__init__()
        self.config = config
        dim, expanded = config.hidden_dim, int(config.hidden_dim * config.mlp_ratio)
        conv_activation = nn.SiLU if config.v2 else nn.SELU
        linear_activation = nn.SiLU() if config.v2 else None

        self.audio_input_proj = input_projection(
            ChannelLastConv1d(config.latent_dim, dim, WIDE_KERNEL),
            conv_activation(),
            SwiGLU(dim, expanded, WIDE_KERNEL),
        )
        self.clip_input_proj = input_projection(
            nn.Linear(config.clip_dim, dim), linear_activation, SwiGLU(dim, expanded, NARROW_KERNEL)
        )
        self.sync_input_proj = input_projection(
            ChannelLastConv1d(config.sync_dim, dim, WIDE_KERNEL),
            conv_activation(),
            SwiGLU(dim, expanded, NARROW_KERNEL),
        )
        self.text_input_proj = input_projection(
            nn.Linear(config.text_dim, dim), linear_activation, SwiGLU(dim, expanded)
        )

        self.clip_cond_proj = nn.Linear(dim, dim)
        self.text_cond_proj = nn.Linear(dim, dim)
        self.global_cond_mlp = SwiGLU(dim, expanded)
        self.sync_pos_emb = nn.Parameter(torch.empty(1, 1, SYNC_TOKENS_PER_SEGMENT, config.sync_dim))
        self.t_embed = TimestepEmbedding(dim, config.time_frequency_dim, config.time_max_period)

        self.joint_blocks = nn.ModuleList(
            JointBlock(dim, config.num_heads, config.mlp_ratio, pre_only=i == config.joint_depth - 1)
            for i in range(config.joint_depth)
        )
        self.fused_blocks = nn.ModuleList(
            StreamBlock(dim, config.num_heads, config.mlp_ratio, NARROW_KERNEL) for _ in range(config.fused_depth)
        )
        self.final_layer = FinalLayer(dim, config.latent_dim)

        self.latent_mean = nn.Parameter(torch.empty(1, 1, config.latent_dim), requires_grad=False)
        self.latent_std = nn.Parameter(torch.empty(1, 1, config.latent_dim), requires_grad=False)
        self.empty_string_feat = nn.Parameter(torch.empty(config.text_seq_len, config.text_dim), requires_grad=False)
        self.empty_clip_feat = nn.Parameter(torch.empty(1, config.clip_dim))
        self.empty_sync_feat = nn.Parameter(torch.empty(1, config.sync_dim))

        self.tables = DerivedTables()

    # -- loading ------------------------------------------------------------------------------

    @classmethod
    def from_state_dict(
        cls,
        config: FlowConfig,
        state_dict: Mapping[str, Tensor],
        source: str = "flow checkpoint",
        device: torch.device | str = "cpu",
    ) -> FlowNetwork:
        """Build the network and load an official state dict strictly (derived buffers it may carry are dropped).

        The skeleton is built without initialising weights: every value comes from ``state_dict``.
        Raises model.checkpoint.CheckpointError naming missing, unexpected and mis-shaped keys.
        """
        with torch.device("meta"):
            net = cls(config)
        net.to_empty(device=device)
        learned = {k: v for k, v in state_dict.items() if k not in NON_PERSISTENT_KEYS}
        load_checked(net, learned, source)
        return net.eval()

    @property
    def dtype(self) -> torch.dtype:
        return self.latent_mean.dtype

    @property
    def device(self) -> torch.device:
        return self.latent_mean.device

    # -- latent statistics ----------------------------------------------------------------------

    def normalize(self, x: Tensor) -> Tensor:
        """Data latents -> the standardised space the flow runs in (returns a new tensor)."""
        return (x - self.latent_mean) / self.latent_std

    def unnormalize(self, x: Tensor) -> Tensor:
        """Sampled latents -> VAE latents: x * std + mean (returns a new tensor)."""
        return x * self.latent_std + self.latent_mean

    # -- conditions -----------------------------------------------------------------------------

    def empty_clip_features(self, batch: int, clip_len: int) -> Tensor:
        """Stand-in CLIP features for requests without video."""
        return self.empty_clip_feat.expand(batch, clip_len, -1)

    def empty_sync_features(self, batch: int, sync_len: int) -> Tensor:
        """Stand-in Synchformer features for requests without video."""
        return self.empty_sync_feat.expand(batch, sync_len, -1)

    def empty_text_features(self, batch: int) -> Tensor:
        """The CLIP text encoding of '' carried by the checkpoint."""
        return self.empty_string_feat.expand(batch, -1, -1)

    def preprocess_conditions(self, clip_f: Tensor, sync_f: Tensor, text_f: Tensor, latent_len: int) -> Conditions:
        """Project the raw features (B, clip_len, clip_dim), (B, sync_len, sync_dim), (B, text_len, text_dim)."""
        sync_len = sync_f.shape[1]
        if sync_len % SYNC_TOKENS_PER_SEGMENT:
            raise ValueError(f"sync features have {sync_len} tokens, not whole segments of {SYNC_TOKENS_PER_SEGMENT}")
        segments = sync_f.to(self.dtype).unflatten(1, (-1, SYNC_TOKENS_PER_SEGMENT))
        sync = self.sync_input_proj((segments + self.sync_pos_emb).flatten(1, 2))
        sync = sync.index_select(1, self._sync_source_index(sync_len, latent_len, sync.device))
        clip = self.clip_input_proj(clip_f.to(self.dtype))
        text = self.text_input_proj(text_f.to(self.dtype))
        return Conditions(
            clip_f=clip,
            sync_f=sync,
            text_f=text,
            clip_f_c=self.clip_cond_proj(clip.mean(dim=1)),
            text_f_c=self.text_cond_proj(text.mean(dim=1)),
        )

    def empty_conditions(
        self, batch: int, latent_len: int, clip_len: int, sync_len: int, negative_text_f: Tensor | None = None
    ) -> Conditions:
        """The unconditional branch: learned empty video features, and the empty prompt or the negative prompts.

        Video parts are computed once and broadcast to ``batch``; ``negative_text_f`` (B or 1 rows) is per sample.
        """
        text = self.empty_text_features(1) if negative_text_f is None else negative_text_f
        single = self.preprocess_conditions(
            self.empty_clip_features(1, clip_len), self.empty_sync_features(1, sync_len), text, latent_len
        )
        return Conditions(
            clip_f=single.clip_f.expand(batch, -1, -1),
            sync_f=single.sync_f.expand(batch, -1, -1),
            text_f=single.text_f.expand(batch, -1, -1),
            clip_f_c=single.clip_f_c.expand(batch, -1),
            text_f_c=single.text_f_c.expand(batch, -1),
        )

    # -- flow -----------------------------------------------------------------------------------

    def _rope(self, length: int, scaling: float, device: torch.device) -> Tensor:
        key = ("rope", length, scaling, device)
        return self.tables.get(
            key, lambda: rope_table(length, scaling, self.config.head_dim, self.config.rope_theta, device)
        )

    def _sync_source_index(self, sync_len: int, latent_len: int, device: torch.device) -> Tensor:
        # The Synchformer token each latent frame takes: upstream's float32 nearest-exact resampling (it differs
        # from 'nearest' when the ratio is fractional).  Fixed here so that it does not follow the activation
        # dtype: float64 picks other tokens for 2 of the 345 latents of 8 s at 44.1 kHz.
        def make() -> Tensor:
            positions = torch.arange(sync_len, dtype=torch.float32).view(1, 1, sync_len)
            return F.interpolate(positions, size=latent_len, mode="nearest-exact").view(latent_len).long().to(device)

        return self.tables.get(("sync_index", sync_len, latent_len, device), make)

    def predict_flow(self, latent: Tensor, t: Tensor, conditions: Conditions) -> Tensor:
        """Velocity for latents (B, latent_len, latent_dim) at times t (B,) (or a scalar for all); module dtype.

        Goes through ``forward`` by calling the module, so that ``FlowNetwork.compile()`` (nn.Module.compile)
        compiles every caller's step: the eager sampler, guided_flow and the captured CUDA-graph step.
        """
        return self(latent, t, conditions)

    def forward(self, latent: Tensor, t: Tensor, conditions: Conditions) -> Tensor:
        batch, latent_len, _ = latent.shape
        clip_len = conditions.clip_f.shape[1]
        if conditions.sync_f.shape[1] != latent_len:
            raise ValueError(f"conditions were made for {conditions.sync_f.shape[1]} latents, got {latent_len}")
        latent_rope = self._rope(latent_len, 1.0, latent.device)
        # clip tokens are spread over the latent time axis: RoPE positions scaled by latent_len / clip_len
        clip_rope = self._rope(clip_len, latent_len / clip_len, latent.device)

        global_c = self.global_cond_mlp(conditions.clip_f_c + conditions.text_f_c)
        global_c = (self.t_embed(t.expand(batch)) + global_c).unsqueeze(1)  # (B, 1, D)
        extended_c = global_c + conditions.sync_f  # (B, latent_len, D)

        x = self.audio_input_proj(latent.to(self.dtype))
        clip, text = conditions.clip_f, conditions.text_f
        for block in self.joint_blocks:
            x, clip, text = block(x, clip, text, global_c, extended_c, latent_rope, clip_rope)
        for block in self.fused_blocks:
            x = block(x, extended_c, latent_rope)
        # upstream modulates the final layer with global_c, not extended_c (MMAudio issue #55)
        return self.final_layer(x, global_c)

    def guided_flow(
        self, t: Tensor, x: Tensor, cond: Conditions, uncond: Conditions, cfg_strength: float | Tensor
    ) -> Tensor:
        """Classifier-free guided velocity cfg * v(cond) + (1 - cfg) * v(uncond), in x's dtype.

        ``t`` is a scalar or (B,) tensor.  ``cfg_strength`` is a float or a (B,) CPU tensor (per request);
        a sample with cfg < 1 gets the conditional flow only, and when no sample needs guidance the
        unconditional branch is not evaluated.  Both branches run as one batch of 2B.
        """
        batch = x.shape[0]
        cfg = torch.as_tensor(cfg_strength, dtype=torch.float32).expand(batch)
        t = torch.as_tensor(t, dtype=torch.float32).to(x.device).expand(batch)
        if not bool((cfg >= 1).any()):
            return self.predict_flow(x, t, cond).to(x.dtype)
        v_cond, v_uncond = self.predict_flow(torch.cat([x, x]), torch.cat([t, t]), cond.cat(uncond)).chunk(2)
        # weight 1 makes a cfg < 1 sample purely conditional; the mix is done in float32
        weight = torch.where(cfg < 1, 1.0, cfg).to(x.device).view(batch, 1, 1)
        return (weight * v_cond + (1 - weight) * v_uncond).to(x.dtype)
