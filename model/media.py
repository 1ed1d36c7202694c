"""Writing results: generated audio as FLAC / WAV / M4A, and the upload remuxed with the generated audio.

The video is never re-encoded: its packets are copied unchanged, cut at the generated duration (or all of them,
for a job that asked for the whole video), and the generated audio is added as AAC.  This keeps the upload's
quality and costs almost nothing.  Everything streams: packets go from the upload to the result as they are
read, audio is converted and encoded a second at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
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


AUDIO_CHUNK_SECONDS = 1.0  # audio is converted and encoded this much at a time: no whole-length copies


def _audio_frame(audio: torch.Tensor, sample_rate: int, sample_format: str, pts: int = 0) -> av.AudioFrame:
    """(C, N) float in [-1, 1] -> one planar AudioFrame of 16-bit ("s16p") or float ("fltp") samples."""
    # numpy, not torch: a second of audio is too little work for torch's thread pool to pay off
    samples = np.clip(audio.detach().float().cpu().numpy(), -1, 1)
    if sample_format == "s16p":
        samples = np.round(samples * 32767).astype(np.int16)  # the 32767 scale keeps +1.0 representable
    planes = np.ascontiguousarray(samples)
    frame = av.AudioFrame.from_ndarray(planes, format=sample_format, layout=_layout(audio))
    frame.sample_rate = sample_rate
    frame.pts = pts
    frame.time_base = Fraction(1, sample_rate)
    return frame


def _audio_frames(audio: torch.Tensor, sample_rate: int, sample_format: str) -> Iterator[av.AudioFrame]:
    """``audio`` (C, N) as consecutive frames of AUDIO_CHUNK_SECONDS (the encoder re-frames them itself)."""
    chunk = max(1, round(AUDIO_CHUNK_SECONDS * sample_rate))
    for start in range(0, audio.shape[-1], chunk):
        yield _audio_frame(audio[:, start : start + chunk], sample_rate, sample_format, pts=start)


def _add_audio_stream(container: av.container.OutputContainer, codec: str, sample_rate: int, layout: str):
    stream = container.add_stream(codec, rate=sample_rate, layout=layout)
    if codec == "aac":
        stream.bit_rate = AAC_BIT_RATE
    return stream


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
        stream = _add_audio_stream(container, encoding.codec, sample_rate, _layout(audio))
        for frame in _audio_frames(audio, sample_rate, encoding.sample_format):
            container.mux(stream.encode(frame))
        container.mux(stream.encode())  # flush


def transcode_audio(source: str | Path, dest: str | Path, fmt: AudioFormatName) -> None:
    """Re-encode the audio file ``source`` as ``fmt`` frame by frame (16-bit samples pass to flac and wav
    unchanged; PyAV's encoder converts them for AAC)."""
    encoding = AUDIO_ENCODINGS[fmt]
    with av.open(str(source)) as container_in, av.open(str(dest), "w", format=encoding.container) as container:
        audio_in = container_in.streams.audio[0]
        stream = _add_audio_stream(container, encoding.codec, audio_in.rate, audio_in.layout.name)
        for frame in container_in.decode(audio_in):
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def _packets_to_keep(packets: Iterable[av.Packet], end_pts: int | None) -> Iterator[av.Packet]:
    """Decode-order packets from the first keyframe through the last one shown before ``end_pts`` (every one
    from the first keyframe when None), as they are demuxed.

    Packets shown later but decoded earlier (references of B-frames) inside that range stay, since the kept
    frames need them: a packet shown at or after the end is held until a later one shown before the end
    proves it is needed (a handful at most: the decoder's reordering depth), and dropped when none comes.
    Reading stops at the first packet decoded at or after the end (it and every later one show after it).
    """
    started = False
    held: list[av.Packet] = []
    for packet in packets:
        if packet.size == 0:  # demux's flush marker carries no data
            continue
        if end_pts is not None and packet.dts is not None and packet.dts >= end_pts:
            return
        started = started or packet.is_keyframe
        if not started:
            continue
        if end_pts is not None and (packet.pts is None or packet.pts >= end_pts):
            held.append(packet)
            continue
        yield from held
        held.clear()
        yield packet


def mux_video(
    video_path: str | Path,
    audio: torch.Tensor,
    sample_rate: int,
    out_path: str | Path,
    duration_sec: float,
    whole_video: bool = False,
) -> None:
    """Write ``out_path`` (format from its suffix, e.g. .mp4): the upload's first video stream copied
    packet for packet up to ``duration_sec`` (all of it with ``whole_video``), plus ``audio`` (C, N) cut to
    ``duration_sec`` as AAC.

    Packets stream from the upload to the output (the audio is encoded alongside, a second at a time, so the
    file is interleaved), so a long video never sits in memory. The upload's other streams (its own audio,
    subtitles, data) are dropped.
    """
    samples = min(audio.shape[-1], round(duration_sec * sample_rate))
    with open_video(video_path) as (source, video_in):
        end_pts = None if whole_video else math.ceil(Fraction(duration_sec) / video_in.time_base)
        # faststart: the index goes first so browsers can play the download while it streams
        with av.open(str(out_path), "w", options={"movflags": "+faststart"}) as out:
            try:
                video_out = out.add_stream_from_template(video_in, opaque=True)
            except ValueError as exc:
                raise UnsupportedCodecError(f"{Path(video_path).name}: {exc}") from exc
            audio_out = _add_audio_stream(out, "aac", sample_rate, _layout(audio))
            frames = _audio_frames(audio[:, :samples], sample_rate, "fltp")
            audio_muxed = 0.0  # seconds of audio handed to the muxer so far
            copied = 0
            for packet in _packets_to_keep(source.demux(video_in), end_pts):
                if packet.dts is not None:  # audio up to this packet's time, so the muxer can interleave
                    shown = float(packet.dts * video_in.time_base)
                    while audio_muxed <= shown and (frame := next(frames, None)) is not None:
                        out.mux(audio_out.encode(frame))
                        audio_muxed += frame.samples / sample_rate
                packet.stream = video_out
                out.mux(packet)
                copied += 1
            if not copied:
                raise MediaError(f"{Path(video_path).name}: no decodable video before {duration_sec:g} s")
            for frame in frames:
                out.mux(audio_out.encode(frame))
            out.mux(audio_out.encode())  # flush
