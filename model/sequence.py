"""Sequence lengths of every stream as a function of the clip duration (official SequenceConfig)."""

from __future__ import annotations

import math
from dataclasses import dataclass

CLIP_FPS = 8  # CLIP frames per second of video
SYNC_FPS = 25  # Synchformer frames per second of video
SYNC_SEGMENT = 16  # frames per Synchformer segment
SYNC_STEP = 8  # hop between segments
SYNC_TOKENS_PER_SEGMENT = 8  # Synchformer halves the 16 frames in time
LATENT_DOWNSAMPLE = 2  # mel frames per latent
MIN_DURATION = SYNC_SEGMENT / SYNC_FPS  # seconds: the shortest video the Synchformer can read (one segment)
TRAINING_DURATION = 8.0  # seconds: every variant was trained on 8 s clips (the official SequenceConfig default)


@dataclass(frozen=True)
class AudioFormat:
    """The audio side of a variant family: 16 kHz (small_16k) or 44.1 kHz (every 44k variant)."""

    name: str
    sampling_rate: int
    hop: int  # mel spectrogram hop in samples
    n_mels: int
    latent_dim: int


AUDIO_16K = AudioFormat("16k", sampling_rate=16000, hop=256, n_mels=80, latent_dim=20)
AUDIO_44K = AudioFormat("44k", sampling_rate=44100, hop=512, n_mels=128, latent_dim=40)


@dataclass(frozen=True)
class SequenceLengths:
    latent: int
    clip: int
    sync: int

    @property
    def sync_frames(self) -> int:
        """Video frames the sync tokens read (whole segments; frames past the last one are never used)."""
        return (self.sync // SYNC_TOKENS_PER_SEGMENT - 1) * SYNC_STEP + SYNC_SEGMENT

    @classmethod
    def for_duration(cls, duration: float, audio: AudioFormat) -> SequenceLengths:
        latent = math.ceil(duration * audio.sampling_rate / audio.hop / LATENT_DOWNSAMPLE)
        clip = int(duration * CLIP_FPS)
        # float floor division, as the official config computes it
        segments = (duration * SYNC_FPS - SYNC_SEGMENT) // SYNC_STEP + 1
        sync = int(segments * SYNC_SEGMENT / LATENT_DOWNSAMPLE)
        return cls(latent=latent, clip=clip, sync=sync)
