"""Long requests as overlapping windows of the training length: the plan, each window's noise, the pins that
make neighbours agree, and the crossfade that joins their waveforms.

Grid.  Windows last ``TRAINING_DURATION`` (8 s) and start every ``stride`` = window - overlap seconds, a whole
number of seconds: one second is the shortest step on which both video streams are whole (8 CLIP frames at
8 fps, 25 Synchformer frames at 25 fps), so window w's CLIP frames are whole-video CLIP frames
[8 s_w, 8 s_w + clip_len) and its sync frames whole-video sync frames [25 s_w, 25 s_w + 25 * duration), the
frames a single request on the video cut at s_w would pick (see model.video).  Synchformer segments (16 frames
every 8) are anchored at each window's own first frame, as in a single request; a whole-video segment grid
would line up with windows only every 8 s, so the Synchformer runs per window (its overlap is encoded twice).
CLIP frames are independent of each other: they are encoded once for the whole video and sliced.

The latent grid (44100 / 1024 = 43.07 latents/s at 44.1 kHz, 31.25 at 16 kHz) meets whole seconds only
every 256 s (resp. 4 s), so a window's latents start at its nearest latent, ``round(s_w * latent_rate)``,
and its audio on that latent's first sample: neighbours' overlaps are whole latents and line up sample by
sample, and audio leads or lags the video by at most half a latent (12 ms at 44.1 kHz, 16 ms at 16 kHz),
under a frame of the 25 fps sync stream.  The last window ends at the request's end (it may be shorter); its
latents end on the whole request's latent count, so the joined audio covers ``int(duration * sample_rate)``.

Pins.  Sampling integrates dx/dt = v from noise (t = 0) to data (t = 1) on x_t = (1 - t) noise + t data
(model.sampler).  A window's latents that overlap an already generated neighbour are pinned: after every
Euler step to t, those frames of x are reset to (1 - t) * own_noise + t * neighbour_latents, the point the
straight path from the window's noise to the neighbour's result passes at t, so at t = 1 they equal the
neighbour's latents exactly and the free frames were generated in their presence (flow-matching inpainting).

Joins.  Each window is decoded on its own; across an overlap the waveforms are joined with an equal-power
crossfade, out = cos(theta) * left + sin(theta) * right with theta rising from 0 to pi/2 (squares sum to 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from model.sequence import CLIP_FPS, SYNC_FPS, TRAINING_DURATION, AudioFormat, SequenceLengths

WindowSchedule = Literal["sequential", "batched"]
SCHEDULES: tuple[WindowSchedule, ...] = ("sequential", "batched")
DEFAULT_OVERLAP = 2.0  # seconds
# two sampling passes whatever the length (measured 1.9x faster sampling than sequential, same continuity)
DEFAULT_SCHEDULE: WindowSchedule = "batched"


@dataclass(frozen=True)
class Window:
    index: int
    start: int  # seconds into the request (a whole number, see the module doc)
    duration: float  # seconds of video this window reads
    latent_start: int  # its first latent in the whole request's latent sequence
    lengths: SequenceLengths  # its own sequence lengths; lengths.latent may differ by one for the last window

    @property
    def clip_start(self) -> int:
        return self.start * CLIP_FPS

    @property
    def sync_start(self) -> int:
        return self.start * SYNC_FPS

    @property
    def latent_end(self) -> int:
        return self.latent_start + self.lengths.latent


def latent_rate(audio: AudioFormat) -> float:
    """Latents per second of audio."""
    return audio.sampling_rate / audio.hop / 2


def check_overlap(overlap: float, window: float = TRAINING_DURATION) -> int:
    """The overlap in whole seconds; at least one second, and under half a window, so that a window pinned at
    both ends (the batched schedule) still has frames of its own."""
    whole = round(overlap)
    if whole != overlap or not 1 <= whole < window / 2:
        raise ValueError(f"the window overlap must be a whole number of seconds in [1, {window / 2:g}), got {overlap}")
    return whole


def window_stride(overlap: float = DEFAULT_OVERLAP, window: float = TRAINING_DURATION) -> int:
    """Seconds from one window's start to the next one's."""
    return int(window) - check_overlap(overlap, window)


def plan_windows(
    duration: float, audio: AudioFormat, overlap: float = DEFAULT_OVERLAP, window: float = TRAINING_DURATION
) -> list[Window]:
    """Windows covering ``duration`` seconds; one window (the single-pass request) when it fits in one."""
    total = SequenceLengths.for_duration(duration, audio)
    if duration <= window:
        return [Window(0, 0, duration, 0, total)]
    stride = window_stride(overlap, window)
    count = math.ceil((duration - window) / stride) + 1
    rate = latent_rate(audio)
    windows = []
    for index in range(count):
        start = index * stride
        length = min(window, duration - start)
        lengths = SequenceLengths.for_duration(length, audio)
        latent_start = math.floor(start * rate + 0.5)
        if index == count - 1:
            lengths = SequenceLengths(total.latent - latent_start, lengths.clip, lengths.sync)
        windows.append(Window(index, start, length, latent_start, lengths))
    return windows


def window_seed(seed: int, index: int) -> int:
    """The seed of a window's noise generator: the request's own seed for window 0 (so its noise is the
    single-pass noise), a hash of (seed, index) for the others."""
    if index == 0:
        return seed
    return int(np.random.SeedSequence([seed % 2**64, index]).generate_state(1, np.uint64)[0])


def window_noise(
    seed: int,
    index: int,
    rows: int,
    lengths: SequenceLengths,
    latent_dim: int,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    """(rows, latent, latent_dim) noise of one window, drawn as the single-pass request draws its own."""
    rng = torch.Generator(device=device).manual_seed(window_seed(seed, index))
    return torch.randn((rows, lengths.latent, latent_dim), generator=rng, device=device, dtype=dtype)


def overlap_latents(window: Window, neighbour: Window) -> tuple[slice, slice]:
    """The overlapping latents as (slice of window's, slice of neighbour's)."""
    start, end = max(window.latent_start, neighbour.latent_start), min(window.latent_end, neighbour.latent_end)
    if start >= end:
        raise ValueError(f"windows {window.index} and {neighbour.index} do not overlap")
    return (
        slice(start - window.latent_start, end - window.latent_start),
        slice(start - neighbour.latent_start, end - neighbour.latent_start),
    )


@dataclass
class Pins:
    """Latent frames held on the straight path from the windows' own noise to given final latents."""

    mask: Tensor  # (B, L, 1) bool: pinned frames
    noise: Tensor  # (B, L, D) the windows' initial noise
    target: Tensor  # (B, L, D) final latents of the pinned frames (anything elsewhere)

    def __call__(self, t: Tensor, x: Tensor) -> Tensor:
        t = t.to(x.device, x.dtype)
        return torch.where(self.mask, (1 - t) * self.noise + t * self.target, x)


def make_pins(
    windows: Sequence[Window],
    noise: Tensor,
    rows: int,
    neighbours: Callable[[Window], Sequence[tuple[Window, Tensor]]],
) -> Pins | None:
    """Pins for a batch of equal-length windows (``rows`` rows each, stacked in ``noise``); ``neighbours(w)``
    names the generated neighbours of window w with their final latents. None when nothing is pinned."""
    mask = torch.zeros(*noise.shape[:2], 1, dtype=torch.bool, device=noise.device)
    target = torch.zeros_like(noise)
    for k, window in enumerate(windows):
        for neighbour, latents in neighbours(window):
            own, theirs = overlap_latents(window, neighbour)
            block = slice(k * rows, (k + 1) * rows)
            mask[block, own] = True
            target[block, own] = latents[:, theirs].to(target.dtype)
    if not mask.any():
        return None
    return Pins(mask, noise, target)


def equal_power_ramps(length: int) -> tuple[Tensor, Tensor]:
    """(fade_out, fade_in) over ``length`` samples: cos and sin of a quarter turn sampled at sample centres."""
    theta = (torch.arange(length, dtype=torch.float64) + 0.5) * (math.pi / 2 / length)
    return theta.cos().float(), theta.sin().float()


def join_waveforms(windows: Sequence[Window], waveforms: Iterable[Tensor], samples_per_latent: int) -> Tensor:
    """(rows, samples) of the whole request: each window's waveform (rows, its samples) at its first latent's
    first sample, crossfaded with the previous window over their overlap.  ``waveforms`` may be a generator:
    each one is needed only until it is placed."""
    end = windows[-1].latent_end * samples_per_latent
    out: Tensor | None = None
    written = 0  # samples of out already final or crossfading
    for window, wave in zip(windows, waveforms, strict=True):
        if out is None:
            out = torch.zeros(wave.shape[0], end, dtype=wave.dtype)
        start = window.latent_start * samples_per_latent
        overlap = written - start  # windows never leave a gap: 0 for the first one
        if overlap:
            fade_out, fade_in = equal_power_ramps(overlap)
            out[:, start:written] = out[:, start:written] * fade_out + wave[:, :overlap] * fade_in
        out[:, written : start + wave.shape[1]] = wave[:, overlap:]
        written = start + wave.shape[1]
    return out
