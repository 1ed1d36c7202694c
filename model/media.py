"""Writing results: generated audio as FLAC / WAV / M4A, and the upload remuxed with the generated audio.

The video is never re-encoded: its packets are copied unchanged, cut at the generated duration,
and the generated audio is added as AAC.  This keeps the upload's quality and costs almost nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO, Literal

import av
import numpy as np
import torch

from model.media_errors import MediaError, UnsupportedCodecError
from model.probe import open_video

AudioFormatName = Literal["flac", "wav", "m4a"]


@dataclass(frozen=True)
class AudioEncoding:
    container: str  # FFmpeg muxer name
    codec: str
    sample_format: str  # what we hand the encoder (PyAV repacks it to the codec's own layout)


AUDIO_ENCODINGS: dict[str, AudioEncoding] = {
    "flac": AudioEncoding("flac", "flac", "s16p"),
    "wav": AudioEncoding("wav", "pcm_s16le", "s16p"),
    "m4a": AudioEncoding("ipod", "aac", "fltp"),
}
AAC_BIT_RATE = 128_000  # near-transparent for the model's (mono) output; 192k costs FFmpeg's encoder 3x the time


def _layout(audio: torch.Tensor) -> str:
    if audio.dim() != 2:
        raise ValueError(f"audio must be (channels, samples), not {tuple(audio.shape)}")
    if audio.shape[0] not in (1, 2):
        raise ValueError(f"audio must have 1 or 2 channels, not {audio.shape[0]}")
    return "mono" if audio.shape[0] == 1 else "stereo"


def _audio_frame(audio: torch.Tensor, sample_rate: int, sample_format: str) -> av.AudioFrame:
    """(C, N) float in [-1, 1] -> one planar AudioFrame of 16-bit ("s16p") or float ("fltp") samples."""
    samples = audio.detach().float().cpu().clamp(-1, 1)
    if sample_format == "s16p":
        samples = (samples * 32767).round().to(torch.int16)  # the 32767 scale keeps +1.0 representable
    planes = np.ascontiguousarray(samples.numpy())
    frame = av.AudioFrame.from_ndarray(planes, format=sample_format, layout=_layout(audio))
    frame.sample_rate = sample_rate
    frame.pts = 0
    frame.time_base = Fraction(1, sample_rate)
    return frame


def _add_audio_stream(container: av.container.OutputContainer, codec: str, sample_rate: int, audio: torch.Tensor):
    stream = container.add_stream(codec, rate=sample_rate, layout=_layout(audio))
    if codec == "aac":
        stream.bit_rate = AAC_BIT_RATE
    return stream


def _encode_all(container: av.container.OutputContainer, stream, frame: av.AudioFrame) -> None:
    container.mux(stream.encode(frame))
    container.mux(stream.encode())  # flush


def write_audio(
    dest: str | Path | BinaryIO, audio: torch.Tensor, sample_rate: int, fmt: AudioFormatName = "flac"
) -> None:
    """Encode (C, N) float audio in [-1, 1] (C = 1 or 2) to a path or a writable binary buffer.

    flac and wav are 16-bit PCM; m4a is AAC in an MP4 (iPod) container.
    """
    if fmt not in AUDIO_ENCODINGS:
        raise ValueError(f"audio format must be one of {sorted(AUDIO_ENCODINGS)}, not {fmt!r}")
    encoding = AUDIO_ENCODINGS[fmt]
    target = str(dest) if isinstance(dest, str | Path) else dest
    with av.open(target, "w", format=encoding.container) as container:
        stream = _add_audio_stream(container, encoding.codec, sample_rate, audio)
        _encode_all(container, stream, _audio_frame(audio, sample_rate, encoding.sample_format))


def _packets_to_keep(packets: list[av.Packet], end_pts: int) -> list[av.Packet]:
    """Decode-order packets from the first keyframe through the last one shown before ``end_pts``.

    Packets shown later but decoded earlier (references of B-frames) inside that range stay,
    since the kept frames need them; everything after it goes.
    """
    start = next((i for i, p in enumerate(packets) if p.is_keyframe), None)
    if start is None:
        return []
    shown_before_end = [i for i, p in enumerate(packets) if i >= start and p.pts is not None and p.pts < end_pts]
    return packets[start : shown_before_end[-1] + 1] if shown_before_end else []


def mux_video(
    video_path: str | Path,
    audio: torch.Tensor,
    sample_rate: int,
    out_path: str | Path,
    duration_sec: float,
) -> None:
    """Write ``out_path`` (format from its suffix, e.g. .mp4): the upload's first video stream copied
    packet for packet up to ``duration_sec``, plus ``audio`` (C, N) cut to ``duration_sec`` as AAC.

    The upload's other streams (its own audio, subtitles, data) are dropped.
    """
    samples = min(audio.shape[-1], round(duration_sec * sample_rate))
    with open_video(video_path) as (source, video_in):
        end_pts = math.ceil(Fraction(duration_sec) / video_in.time_base)  # shown before the end: pts < end_pts
        packets = []
        for packet in source.demux(video_in):
            if packet.size == 0:  # demux's flush marker carries no data
                continue
            if packet.dts is not None and packet.dts >= end_pts:
                break  # decode order: this and every later packet is shown (pts >= dts) after the end
            packets.append(packet)
        keep = _packets_to_keep(packets, end_pts)
        if not keep:
            raise MediaError(f"{Path(video_path).name}: no decodable video before {duration_sec:g} s")
        # faststart: the index goes first so browsers can play the download while it streams
        with av.open(str(out_path), "w", options={"movflags": "+faststart"}) as out:
            try:
                video_out = out.add_stream_from_template(video_in, opaque=True)
            except ValueError as exc:
                raise UnsupportedCodecError(f"{Path(video_path).name}: {exc}") from exc
            audio_out = _add_audio_stream(out, "aac", sample_rate, audio)
            for packet in keep:
                packet.stream = video_out
                out.mux(packet)
            _encode_all(out, audio_out, _audio_frame(audio[:, :samples], sample_rate, "fltp"))
