"""BigVGAN vocoders: log-mel (B, n_mels, T) -> waveform (B, 1, T * hop) in [-1, 1].

Two official generators share this architecture: BigVGAN v1 as trained by MMAudio for 16 kHz
(``best_netG.pt``, tanh output) and NVIDIA's BigVGAN v2 ``bigvgan_v2_44khz_128band_512x``
(``bigvgan_generator.pt``, bias-free last conv, clamped output).  Both store weight-normed convs
(W = g v / ||v||) under the ``{'generator': state_dict}`` key; modules are built with torch's
weight-norm parametrization so those keys load as they are, and g, v are folded into plain weights
right after loading.  Parameter names are those of the official files.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from model.checkpoint import Loadable, load_checked
from model.sequence import AUDIO_16K, AUDIO_44K

# Anti-aliasing around every activation: x2 upsampling, activation, x2 downsampling, both with one
# Kaiser-windowed sinc low-pass (cutoff and transition half-width in cycles per sample at the x2 rate).
RESAMPLE_TAPS = 12
LOWPASS_CUTOFF = 0.25
LOWPASS_HALF_WIDTH = 0.3
PHASE_TAPS = RESAMPLE_TAPS // 2  # an x2 polyphase split leaves this many taps per phase
EDGE = PHASE_TAPS - 1  # replicate padding (samples) of the upsampler's input and before the downsampler's input
SNAKE_EPS = 1e-9
assert EDGE == 5, "Upsample2x's phase-plane layout is worked out for 12 taps"


@dataclass(frozen=True)
class VocoderConfig:
    n_mels: int
    sampling_rate: int
    upsample_rates: tuple[int, ...]
    upsample_kernel_sizes: tuple[int, ...]
    initial_channels: int = 1536  # halved by every upsampling stage
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilations: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    io_kernel_size: int = 7  # conv_pre and conv_post
    final_bias: bool = True
    final_tanh: bool = True  # False: clamp to [-1, 1] instead

    @property
    def hop(self) -> int:
        """Waveform samples per mel frame."""
        return math.prod(self.upsample_rates)

    def channels(self, stage: int) -> int:
        """Channels after upsampling stage ``stage``."""
        return self.initial_channels // 2 ** (stage + 1)

    def tiny(self) -> VocoderConfig:
        """Narrow copy with the same upsampling (same hop and sampling rate) for the offline preset and tests:
        one channel in the last stage, where the signal is longest."""
        return replace(self, initial_channels=2 ** len(self.upsample_rates))

    @classmethod
    def from_bigvgan_json(cls, h: Mapping[str, Any]) -> VocoderConfig:
        """From an official BigVGAN hyper-parameter file (``config.json`` of the v2 releases).

        A file without ``use_bias_at_final`` / ``use_tanh_at_final`` means True (the v1 behaviour), as officially.
        """
        unsupported = {
            "resblock": (h.get("resblock"), "1"),
            "activation": (h.get("activation"), "snakebeta"),
            "snake_logscale": (h.get("snake_logscale"), True),
        }
        wrong = [f"{k}={got!r} (want {want!r})" for k, (got, want) in unsupported.items() if got != want]
        if wrong:
            raise ValueError("unsupported BigVGAN config: " + ", ".join(wrong))
        return cls(
            n_mels=h["num_mels"],
            sampling_rate=h["sampling_rate"],
            upsample_rates=tuple(h["upsample_rates"]),
            upsample_kernel_sizes=tuple(h["upsample_kernel_sizes"]),
            initial_channels=h["upsample_initial_channel"],
            resblock_kernel_sizes=tuple(h["resblock_kernel_sizes"]),
            resblock_dilations=tuple(tuple(d) for d in h["resblock_dilation_sizes"]),
            final_bias=h.get("use_bias_at_final", True),
            final_tanh=h.get("use_tanh_at_final", True),
        )


BIGVGAN_16K = VocoderConfig(
    n_mels=AUDIO_16K.n_mels,
    sampling_rate=AUDIO_16K.sampling_rate,
    upsample_rates=(4, 4, 2, 2, 2, 2),
    upsample_kernel_sizes=(8, 8, 4, 4, 4, 4),
)
BIGVGAN_V2_44K = VocoderConfig(
    n_mels=AUDIO_44K.n_mels,
    sampling_rate=AUDIO_44K.sampling_rate,
    upsample_rates=(8, 4, 2, 2, 2, 2),
    upsample_kernel_sizes=(16, 8, 4, 4, 4, 4),
    final_bias=False,
    final_tanh=False,
)
VOCODER_CONFIGS = {AUDIO_16K.name: BIGVGAN_16K, AUDIO_44K.name: BIGVGAN_V2_44K}
assert BIGVGAN_16K.hop == AUDIO_16K.hop and BIGVGAN_V2_44K.hop == AUDIO_44K.hop


def kaiser_beta(attenuation_db: float) -> float:
    """Kaiser's empirical window shape for a given stopband attenuation."""
    if attenuation_db > 50:
        return 0.1102 * (attenuation_db - 8.7)
    if attenuation_db >= 21:
        return 0.5842 * (attenuation_db - 21) ** 0.4 + 0.07886 * (attenuation_db - 21)
    return 0.0


def lowpass_taps() -> torch.Tensor:
    """The (1, 1, RESAMPLE_TAPS) Kaiser-sinc low-pass, summing to 1 (computed in float32, like the reference)."""
    half = RESAMPLE_TAPS // 2
    attenuation = 2.285 * (half - 1) * math.pi * 4 * LOWPASS_HALF_WIDTH + 7.95
    window = torch.kaiser_window(RESAMPLE_TAPS, periodic=False, beta=kaiser_beta(attenuation))
    time = torch.arange(-half, half) + 0.5  # even length: taps sit half-way between samples
    taps = 2 * LOWPASS_CUTOFF * window * torch.sinc(2 * LOWPASS_CUTOFF * time)
    return (taps / taps.sum()).view(1, 1, RESAMPLE_TAPS)


def upsample_phase_filters(taps: torch.Tensor) -> torch.Tensor:
    """(2, PHASE_TAPS) filters giving the odd (row 0) and even (row 1) samples of the x2 upsampled signal.

    Upsampling is zero-stuffing then the low-pass (a transposed conv, i.e. a correlation with the flipped
    taps) with a gain of 2 for the energy the zeros take: every output sample only meets every other tap.
    """
    flipped = 2 * taps.flatten().flip(0)
    return flipped.view(PHASE_TAPS, 2).T.flip(0)


def downsample_phase_filters(taps: torch.Tensor) -> torch.Tensor:
    """(2, PHASE_TAPS): the low-pass taps that meet the even (row 0) and the odd (row 1) input samples."""
    return taps.flatten().view(PHASE_TAPS, 2).T


class Upsample2x(nn.Module):
    """x (B, C, T) -> the x2 low-passed signal y (2T samples) as the downsampler wants it: replicate-padded
    by EDGE samples at both ends and split into its even and odd samples, planes (B, C, 2, T + EDGE) with
    planes[..., p, i] = padded_y[2 i + p].

    Computed as two short filters on the input (polyphase) instead of a transposed conv over a signal
    that is half zeros, and laid out so that the downsampler is a plain (2 x PHASE_TAPS) depthwise conv.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("filter", lowpass_taps())
        self.register_buffer("phase_filters", torch.empty(2 * channels, 1, PHASE_TAPS), persistent=False)
        self.derive_constants()

    @torch.no_grad()
    def derive_constants(self) -> None:
        channels = self.phase_filters.shape[0] // 2
        self.phase_filters.copy_(upsample_phase_filters(self.filter).repeat(channels, 1).unsqueeze(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, length = x.shape
        x = F.pad(x, (EDGE, EDGE), mode="replicate")
        # padded_y[2i] = y[2i - 5] (odd samples) and padded_y[2i + 1] = y[2i - 4] (even samples) both need the
        # input window x[i - 5 : i + 1], i.e. padded x[i : i + PHASE_TAPS]: one conv, two filters per channel
        planes = F.conv1d(x, self.phase_filters, groups=channels).view(batch, channels, 2, length + EDGE)
        # the first and last EDGE samples of padded_y repeat y[0] = padded_y[5] and y[2T - 1] = padded_y[2T + 4]
        first, last = planes[..., 1, 2:3], planes[..., 0, length + 2 : length + 3]
        planes[..., 0, :3] = first  # padded_y[0, 2, 4]
        planes[..., 1, :2] = first  # padded_y[1, 3]
        planes[..., 0, length + 3 :] = last  # padded_y[2T + 6, 2T + 8]
        planes[..., 1, length + 2 :] = last  # padded_y[2T + 5, 2T + 7, 2T + 9]
        return planes


class LowPass2x(nn.Module):
    """Low-pass and keep every other sample: padded planes (B, C, 2, T + EDGE) -> (B, C, T)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("filter", lowpass_taps())
        self.register_buffer("phase_filters", torch.empty(channels, 1, 2, PHASE_TAPS), persistent=False)
        self.derive_constants()

    @torch.no_grad()
    def derive_constants(self) -> None:
        self.phase_filters.copy_(downsample_phase_filters(self.filter).expand_as(self.phase_filters))

    def forward(self, planes: torch.Tensor) -> torch.Tensor:
        return F.conv2d(planes, self.phase_filters, groups=planes.shape[1]).squeeze(2)


class Downsample2x(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.lowpass = LowPass2x(channels)  # the extra level gives the official key name downsample.lowpass.filter

    def forward(self, planes: torch.Tensor) -> torch.Tensor:
        return self.lowpass(planes)


class SnakeBeta(nn.Module):
    """x + sin^2(a x) / b per channel, with a = exp(alpha), b = exp(beta) (log-scale parameters)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.empty(channels))
        self.beta = nn.Parameter(torch.empty(channels))
        # a and 1 / (b + eps), derived once from the loaded parameters; shaped for (B, C, 2, L) planes
        self.register_buffer("frequency", torch.empty(channels, 1, 1), persistent=False)
        self.register_buffer("inverse_magnitude", torch.empty(channels, 1, 1), persistent=False)

    @torch.no_grad()
    def derive_constants(self) -> None:
        self.frequency.copy_(self.alpha.exp().view_as(self.frequency))
        self.inverse_magnitude.copy_((1.0 / (self.beta.exp() + SNAKE_EPS)).view_as(self.inverse_magnitude))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Overwrites and returns x (B, C, ...): callers pass a temporary of their own."""
        wave = x * self.frequency
        wave.sin_()
        wave.mul_(wave)
        return x.addcmul_(wave, self.inverse_magnitude)


def sliced_anti_aliased_snake(
    x: torch.Tensor,
    up_filters: torch.Tensor,
    down_filters: torch.Tensor,
    frequency: torch.Tensor,
    inverse_magnitude: torch.Tensor,
) -> torch.Tensor:
    """The anti-aliased SnakeBeta of (B, C, T) as shifted multiply-adds on slices, the form a compiler fuses.

    The same polyphase arithmetic as Upsample2x -> SnakeBeta -> Downsample2x (``up_filters``, ``down_filters``:
    the (2, PHASE_TAPS) phase filters; ``frequency``, ``inverse_magnitude``: SnakeBeta's (C, 1, 1) constants),
    written without convolutions or in-place edge writes: inductor turns it into two kernels (upsample + snake,
    downsample), where the convolution form makes about 13 passes over memory.
    """
    length = x.shape[-1]
    # y[2m] needs x[m - 3 : m + 3] and y[2m + 1] needs x[m - 2 : m + 4]: pad x by 3 replicated samples per side
    padded = F.pad(x, (3, 3), mode="replicate")
    odd = sum(up_filters[0, k] * padded[..., k + 1 : k + 1 + length] for k in range(PHASE_TAPS))
    even = sum(up_filters[1, k] * padded[..., k : k + length] for k in range(PHASE_TAPS))
    y = torch.stack([odd, even], dim=2)  # (B, C, 2, T), as Upsample2x's planes without their padding
    y = y + torch.sin(y * frequency) ** 2 * inverse_magnitude
    # Upsample2x's padded planes: replicate y[0] (even[0]) on the left, y[2T - 1] (odd[T - 1]) on the right
    first, last = y[..., 1, :1], y[..., 0, -1:]
    odd_planes = torch.cat([first.expand(*first.shape[:-1], 3), y[..., 0, :], last.expand(*last.shape[:-1], 2)], -1)
    even_planes = torch.cat([first.expand(*first.shape[:-1], 2), y[..., 1, :], last.expand(*last.shape[:-1], 3)], -1)
    return sum(
        down_filters[0, j] * odd_planes[..., j : j + length] + down_filters[1, j] * even_planes[..., j : j + length]
        for j in range(PHASE_TAPS)
    )


class AntiAliasedSnakeBeta(nn.Module):
    """SnakeBeta evaluated at twice the sample rate so its harmonics above Nyquist are filtered out.

    Eagerly, convolutions (few kernels); with ``sliced`` set (BigVGAN.compile_activations) the compiled
    sliced_anti_aliased_snake, one function shared by every activation.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.act = SnakeBeta(channels)
        self.upsample = Upsample2x(channels)
        self.downsample = Downsample2x(channels)
        self.sliced: Callable[..., torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sliced is not None:
            return self.sliced(x, *self.phase_filters(), self.act.frequency, self.act.inverse_magnitude)
        # the activation is pointwise, so it commutes with the replicate padding the upsampler adds
        return self.downsample(self.act(self.upsample(x)))

    def phase_filters(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (2, PHASE_TAPS) up- and downsampling phase filters (every channel has the same)."""
        return self.upsample.phase_filters[:2, 0], self.downsample.lowpass.phase_filters[0, 0]


class AMPBlock(nn.Module):
    """Residual block: per dilation, x += conv2(act(conv1_dilated(act(x))))."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            weight_norm(nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=d * (kernel_size - 1) // 2))
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            weight_norm(nn.Conv1d(channels, channels, kernel_size, padding=(kernel_size - 1) // 2)) for _ in dilations
        )
        # one activation before each conv: activations[2i] feeds convs1[i], activations[2i + 1] feeds convs2[i]
        self.activations = nn.ModuleList(AntiAliasedSnakeBeta(channels) for _ in range(2 * len(dilations)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (conv1, conv2) in enumerate(zip(self.convs1, self.convs2, strict=True)):
            h = conv1(self.activations[2 * i](x))
            x = x + conv2(self.activations[2 * i + 1](h))
        return x


LEGACY_WEIGHT_NORM_SUFFIXES = {
    ".weight_g": ".parametrizations.weight.original0",
    ".weight_v": ".parametrizations.weight.original1",
}


def with_parametrization_names(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename legacy ``torch.nn.utils.weight_norm`` keys (weight_g / weight_v) to the parametrization ones."""
    renamed = {}
    for key, value in state_dict.items():
        for legacy, current in LEGACY_WEIGHT_NORM_SUFFIXES.items():
            if key.endswith(legacy):
                key = key.removesuffix(legacy) + current
                break
        renamed[key] = value
    return renamed


class BigVGAN(Loadable, nn.Module):
    container = "generator"  # official files are {'generator': state_dict, ...}

    def __init__(self, config: VocoderConfig) -> None:
        super().__init__()
        self.config = config
        k = config.io_kernel_size
        self.conv_pre = weight_norm(nn.Conv1d(config.n_mels, config.initial_channels, k, padding=k // 2))
        # each stage sits in a one-element list: the official key layout is ups.<stage>.0.*
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        in_channels = config.initial_channels
        for stage, (rate, kernel) in enumerate(zip(config.upsample_rates, config.upsample_kernel_sizes, strict=True)):
            out_channels = config.channels(stage)
            upsample = nn.ConvTranspose1d(in_channels, out_channels, kernel, rate, padding=(kernel - rate) // 2)
            self.ups.append(nn.ModuleList([weight_norm(upsample)]))
            self.resblocks.extend(
                AMPBlock(out_channels, kernel_size, dilations)
                for kernel_size, dilations in zip(config.resblock_kernel_sizes, config.resblock_dilations, strict=True)
            )
            in_channels = out_channels
        self.activation_post = AntiAliasedSnakeBeta(in_channels)
        self.conv_post = weight_norm(nn.Conv1d(in_channels, 1, k, padding=k // 2, bias=config.final_bias))

    @classmethod
    def from_state_dict(
        cls, config: VocoderConfig, state_dict: Mapping[str, torch.Tensor], source: str = "vocoder checkpoint"
    ) -> BigVGAN:
        """Strictly load a generator state dict (either weight-norm naming) into a fresh float32 module, fold g, v
        and derive the activations' constants (exp of the log-scale parameters, polyphase filters); eval mode.
        Cast afterwards, not before: the reference folds the weights in float32.
        """
        vocoder = cls(config)
        load_checked(vocoder, with_parametrization_names(state_dict), source)
        for module in list(vocoder.modules()):
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight")
            if isinstance(module, (SnakeBeta, Upsample2x, LowPass2x)):
                module.derive_constants()
        return vocoder.eval()

    def compile_activations(self, mode: str | None = None) -> None:
        """Run every anti-aliased activation as one compiled sliced_anti_aliased_snake (dynamic shapes: a single
        compilation serves every stage's channels and lengths).  The convolutions stay cuDNN's / oneDNN's."""
        sliced = torch.compile(sliced_anti_aliased_snake, mode=mode, dynamic=True)
        for module in self.modules():
            if isinstance(module, AntiAliasedSnakeBeta):
                module.sliced = sliced

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, n_mels, T) -> (B, 1, T * hop)."""
        x = self.conv_pre(mel)
        blocks_per_stage = len(self.config.resblock_kernel_sizes)
        for stage, (upsample,) in enumerate(self.ups):
            x = upsample(x)
            blocks = self.resblocks[stage * blocks_per_stage : (stage + 1) * blocks_per_stage]
            total = blocks[0](x)
            for block in blocks[1:]:
                total = total + block(x)
            x = total / blocks_per_stage  # the block outputs are averaged
        x = self.conv_post(self.activation_post(x))
        return torch.tanh(x) if self.config.final_tanh else x.clamp(-1.0, 1.0)
