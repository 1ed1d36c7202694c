"""The mel decoder of MMAudio's 1-D VAE: latents (B, L, latent_dim) -> log-mel (B, n_mels, 2L).

The network follows EDM2's magnitude-preserving design: unit-norm ("forced") weights, pixel norm
on every residual input, SiLU rescaled to unit magnitude and residual sums that keep magnitude.
Checkpoints store the raw weights; they are normalised once, in float32, when loaded.
Parameter names are those of the official checkpoints (``v1-16.pth`` / ``v1-44.pth``), which
also carry the encoder: we only decode, so ``encoder.*`` is skipped on load.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from model.checkpoint import Loadable, load_checked
from model.sequence import AUDIO_16K, AUDIO_44K, LATENT_DOWNSAMPLE

NORM_EPS = 1e-4  # added to every normalising magnitude (weights and activations)
SILU_MAGNITUDE = 0.596  # E[silu(z)^2]^0.5 for z ~ N(0, 1): dividing by it keeps unit magnitude
RESIDUAL_WEIGHT = 0.3  # share of the branch in every magnitude-preserving residual sum


@dataclass(frozen=True)
class VAEConfig:
    n_mels: int
    latent_dim: int
    width: int  # channels of the finest level; coarser levels use width * mult
    channel_mults: tuple[int, ...] = (1, 2, 4)
    blocks_per_level: int = 3
    upsample_levels: tuple[int, ...] = (1,)  # levels followed by a x2 time upsampling
    kernel_size: int = 3
    activation_limit: float = 256.0  # activations are clamped to +-limit after each block

    @property
    def time_upsampling(self) -> int:
        return 2 ** len(self.upsample_levels)

    def tiny(self) -> VAEConfig:
        """Same structure and shapes at the ends, narrow inside (offline ``tiny`` preset, tests)."""
        return replace(self, width=8)


VAE_16K = VAEConfig(n_mels=AUDIO_16K.n_mels, latent_dim=AUDIO_16K.latent_dim, width=384)
VAE_44K = VAEConfig(n_mels=AUDIO_44K.n_mels, latent_dim=AUDIO_44K.latent_dim, width=512)
VAE_CONFIGS = {AUDIO_16K.name: VAE_16K, AUDIO_44K.name: VAE_44K}
assert all(c.time_upsampling == LATENT_DOWNSAMPLE for c in VAE_CONFIGS.values())


def normalize(x: torch.Tensor, dim: int | tuple[int, ...]) -> torch.Tensor:
    """Scale ``x`` to unit root-mean-square over ``dim`` (norm taken in float32, as EDM2 does)."""
    dims = (dim,) if isinstance(dim, int) else dim
    size = math.prod(x.shape[d] for d in dims)
    norm = torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=torch.float32)
    # eps + norm / sqrt(size) as one fused add: bit-identical to the reference's rounding
    return x / torch.add(NORM_EPS, norm, alpha=math.sqrt(1 / size)).to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x) / SILU_MAGNITUDE


def mp_sum(x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    t = RESIDUAL_WEIGHT
    return x.lerp(branch, t) / math.sqrt((1 - t) ** 2 + t**2)


class MPConv1d(nn.Module):
    """Bias-free convolution whose weight rows are forced to unit norm (``normalize_weight_``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size))

    @torch.no_grad()
    def normalize_weight_(self) -> None:
        """Each output channel becomes unit-norm over (in, k); done once, after loading raw weights."""
        weight = self.weight.float()
        fan_in = weight[0].numel()
        self.weight.copy_(normalize(weight, dim=(1, 2)) / math.sqrt(fan_in))

    def forward(self, x: torch.Tensor, gain: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.weight if gain is None else self.weight * gain
        return F.conv1d(x, weight, padding=weight.shape[-1] // 2)


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv1 = MPConv1d(in_channels, out_channels, kernel_size)
        self.conv2 = MPConv1d(out_channels, out_channels, kernel_size)
        self.nin_shortcut = MPConv1d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = normalize(x, dim=1)  # pixel norm over channels
        h = self.conv2(mp_silu(self.conv1(mp_silu(x))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return mp_sum(x, h)


class AttnBlock(nn.Module):
    """Single-head self-attention over time with cosine (unit-norm) queries, keys and values."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.qkv = MPConv1d(channels, 3 * channels, 1)
        self.proj_out = MPConv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, length = x.shape
        # qkv output channels are interleaved: channel c of q/k/v is row 3c + 0/1/2
        qkv = normalize(self.qkv(x).view(batch, channels, 3, length), dim=1)
        q, k, v = (t.transpose(1, 2).unsqueeze(1) for t in qkv.unbind(2))  # (B, 1, L, C)
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2)
        return mp_sum(x, self.proj_out(h))


class Upsample(nn.Module):
    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = MPConv1d(channels, channels, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest-exact"))


class DecoderLevel(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, config: VAEConfig, upsample: bool) -> None:
        super().__init__()
        widths = [in_channels] + [out_channels] * config.blocks_per_level
        self.block = nn.ModuleList(ResBlock(a, b, config.kernel_size) for a, b in itertools.pairwise(widths))
        self.upsample = Upsample(out_channels, config.kernel_size) if upsample else None


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        k = config.kernel_size
        widths = [config.width * m for m in config.channel_mults]
        self.conv_in = MPConv1d(config.latent_dim, widths[-1], k)
        self.mid = nn.ModuleDict(
            {
                "block_1": ResBlock(widths[-1], widths[-1], k),
                "attn_1": AttnBlock(widths[-1]),
                "block_2": ResBlock(widths[-1], widths[-1], k),
            }
        )
        # up[i] works at width widths[i] and runs after up[i + 1] (coarsest first, fed by the middle)
        inputs = [*widths[1:], widths[-1]]
        self.up = nn.ModuleList(
            DecoderLevel(inputs[i], widths[i], config, upsample=i in config.upsample_levels) for i in range(len(widths))
        )
        self.conv_out = MPConv1d(widths[0], config.n_mels, k)
        self.learnable_gain = nn.Parameter(torch.empty(()))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        limit = self.config.activation_limit
        h = self.conv_in(z)
        for layer in self.mid.values():
            h = layer(h)
        h = h.clamp(-limit, limit)
        for level in reversed(self.up):
            for block in level.block:
                h = block(h).clamp(-limit, limit)
            if level.upsample is not None:
                h = level.upsample(h)
        return self.conv_out(mp_silu(h), gain=self.learnable_gain + 1)


class VAEDecoder(Loadable, nn.Module):
    """Latent -> log-mel; holds the decoder and the mel statistics it was trained to output."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.decoder = Decoder(config)
        self.register_buffer("data_mean", torch.zeros(1, config.n_mels, 1))
        self.register_buffer("data_std", torch.ones(1, config.n_mels, 1))

    @classmethod
    def from_state_dict(
        cls, config: VAEConfig, state_dict: Mapping[str, torch.Tensor], source: str = "VAE checkpoint"
    ) -> VAEDecoder:
        """The decoder (float32, eval mode) of an official VAE state dict (encoder keys ignored), its weights
        force-normalised.  Cast afterwards, not before: the reference normalises the float32 weights.
        """
        vae = cls(config)
        load_checked(vae, state_dict, source, ignore_prefixes=("encoder.",))
        for module in vae.modules():
            if isinstance(module, MPConv1d):
                module.normalize_weight_()
        return vae.eval()

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """(B, L, latent_dim) -> mel (B, n_mels, 2L)."""
        mel = self.decoder(latent.transpose(1, 2))
        return mel * self.data_std + self.data_mean

