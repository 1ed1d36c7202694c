"""Writing generated audio (flac / wav / m4a) and remuxing it with the uploaded video, checked by decoding back."""

from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from model.media import _packets_to_keep, mux_video, write_audio
from model.media_errors import MediaError
from model.testkit import make_vfr_video, make_video, sine, video_packets
from model.video import load_video


def decode_audio(source) -> tuple[np.ndarray, av.audio.stream.AudioStream, float]:
    """All samples (C, N) as float, the stream, and its declared duration in seconds."""
    with av.open(source) as container:
        stream = container.streams.audio[0]
        planes = []
        for frame in container.decode(stream):
            samples = frame.to_ndarray()
            # packed formats come as one interleaved row
            planes.append(samples if frame.format.is_planar else samples.reshape(-1, stream.channels).T)
        samples = np.concatenate(planes, axis=-1)
        if samples.dtype == np.int16:
            samples = samples / 32767
        return samples, stream, float(stream.duration * stream.time_base)


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize(
    ("fmt", "codec", "lossless"), [("flac", "flac", True), ("wav", "pcm_s16le", True), ("m4a", "aac", False)]
)
def test_audio_formats_decode_back(tmp_path: Path, fmt, codec, lossless, channels) -> None:
    rate, seconds = 16000, 1.5
    audio = torch.from_numpy(sine(seconds, rate, channels))
    audio[-1] *= 0.5  # channels differ, so a swap or a mixdown would show
    buffer = io.BytesIO()
    write_audio(buffer, audio, rate, fmt)
    buffer.seek(0)
    decoded, stream, declared = decode_audio(buffer)
    assert stream.codec_context.name == codec and stream.rate == rate and stream.channels == channels
    n = audio.shape[1]
    assert declared == pytest.approx(seconds, abs=1 / rate)
    if lossless:
        assert decoded.shape == (channels, n)
        assert np.abs(decoded - audio.numpy()).max() <= 1 / 32767
    else:  # AAC: encoder priming is hidden by the container; the last frame is padded
        assert n <= decoded.shape[1] < n + 1024
        for c in range(channels):
            assert np.corrcoef(decoded[c, 2048:n], audio[c, 2048:n].numpy())[0, 1] > 0.99


def test_write_audio_to_a_path_and_rejects_bad_input(tmp_path: Path) -> None:
    audio = torch.from_numpy(sine(0.5, 16000))
    write_audio(tmp_path / "out.flac", audio, 16000, "flac")
    assert decode_audio(str(tmp_path / "out.flac"))[0].shape == (1, 8000)
    with pytest.raises(ValueError, match="format"):
        write_audio(tmp_path / "out.ogg", audio, 16000, "ogg")
    with pytest.raises(ValueError, match="channels"):
        write_audio(tmp_path / "out.wav", torch.zeros(3, 100), 16000, "wav")
    with pytest.raises(ValueError, match="channels, samples"):
        write_audio(tmp_path / "out.wav", torch.zeros(100), 16000, "wav")


def rotation_of(path: Path) -> int:
    with av.open(str(path)) as container:
        return next(container.decode(video=0)).rotation


@pytest.mark.parametrize(("preset", "rotation"), [("veryfast", 0), ("ultrafast", -90)])
def test_mux_copies_video_packets_and_adds_generated_aac(tmp_path: Path, preset, rotation) -> None:
    fps, duration, rate = 25, 1.3, 16000
    upload = make_video(tmp_path / "upload.mp4", 2.0, fps, with_audio=True, preset=preset, rotation=rotation)
    generated = torch.from_numpy(sine(2.0, rate))  # longer than the duration, as the model's output is
    out = tmp_path / "result.mp4"
    mux_video(upload, generated, rate, out, duration)

    with av.open(str(out)) as container:
        kinds = [(s.type, s.codec_context.name) for s in container.streams]
    assert kinds == [("video", "h264"), ("audio", "aac")]  # the upload's own (44.1 kHz stereo) audio is gone

    source, kept = video_packets(upload), video_packets(out)
    assert rotation_of(out) == rotation
    assert kept == source[: len(kept)]  # a decode-order prefix, byte-identical, same timestamps
    assert kept[0][3]  # starts on a keyframe
    shown = sorted(p[0] for p in kept)
    expected_shown = [p[0] for p in sorted(source) if p[0] < duration]
    assert shown[: len(expected_shown)] == expected_shown  # every frame before the cut is there
    late = [t for t in shown if t >= duration]
    assert len(late) <= (2 if preset == "veryfast" else 0)  # only B-frame anchors the kept frames need

    decoded, stream, declared = decode_audio(str(out))
    assert stream.rate == rate and stream.channels == 1
    assert declared == round(duration * rate) / rate
    assert round(duration * rate) <= decoded.shape[1] < round(duration * rate) + 1024
    with av.open(str(out)) as container:
        assert sum(1 for _ in container.decode(video=0)) == len(kept)  # everything kept decodes


def test_muxed_result_loads_like_the_upload(tmp_path: Path) -> None:
    """The copied video still gives the model identical frames (up to the cut)."""
    upload = make_video(tmp_path / "upload.mp4", 1.2, 30, with_audio=True)
    mux_video(upload, torch.from_numpy(sine(1.2, 44100, 2)), 44100, tmp_path / "result.mp4", 0.9)
    before, after = load_video(upload, 0.9), load_video(tmp_path / "result.mp4", 0.9)
    assert after.duration_sec == before.duration_sec
    assert torch.equal(after.clip_frames, before.clip_frames)
    assert torch.equal(after.sync_frames, before.sync_frames)


@pytest.mark.parametrize(("suffix", "codec"), [("mkv", "libx264"), ("ts", "libx264"), ("webm", "libvpx-vp9")])
def test_mux_accepts_other_upload_containers(tmp_path: Path, suffix, codec) -> None:
    """Matroska leaves the first packets without dts, MPEG-TS starts late, WebM carries VP9."""
    upload = make_video(tmp_path / f"upload.{suffix}", 1.0, 25, codec=codec)
    mux_video(upload, torch.from_numpy(sine(1.0, 16000)), 16000, tmp_path / "result.mp4", 0.7)
    before, after = load_video(upload, 0.7), load_video(tmp_path / "result.mp4", 0.7)
    assert torch.equal(after.sync_u8, before.sync_u8) and torch.equal(after.clip_u8, before.clip_u8)


def test_mux_rejects_a_cut_before_the_first_frame(tmp_path: Path) -> None:
    upload = make_video(tmp_path / "upload.mp4", 0.5, 25)
    with pytest.raises(MediaError):
        mux_video(upload, torch.zeros(1, 100), 16000, tmp_path / "result.mp4", 0.0)


VFR_FRAME_MS = [40, 40, 33, 100, 20, 66, 40, 250, 40] * 4  # 36 frames of 20 to 250 ms: 2.516 s


@pytest.mark.parametrize("preset", ["veryfast", "ultrafast"])  # with B-frames (reordered) and without
def test_mux_of_a_variable_frame_rate_video_keeps_every_packet_and_exact_audio(tmp_path: Path, preset) -> None:
    upload = make_vfr_video(tmp_path / "vfr.mp4", VFR_FRAME_MS, preset=preset)
    source = video_packets(upload)
    gaps = {round(b - a, 3) for a, b in zip(*[sorted(p[0] for p in source)[i:] for i in (0, 1)], strict=False)}
    assert {0.02, 0.033, 0.25} <= gaps  # really variable
    rate, duration = 16000, 2.41  # the generated length: no frame boundary
    generated = torch.from_numpy(sine(3.0, rate))

    whole = tmp_path / "whole.mp4"
    mux_video(upload, generated, rate, whole, duration, whole_video=True)
    assert video_packets(whole) == source  # every packet: same bytes, pts, dts and keyframe flags, same order
    decoded, _, declared = decode_audio(str(whole))
    n = round(duration * rate)
    assert declared == n / rate and n <= decoded.shape[1] < n + 1024  # AAC: the last frame is padded

    cut = tmp_path / "cut.mp4"
    mux_video(upload, generated, rate, cut, 1.0)
    kept = video_packets(cut)
    assert kept == source[: len(kept)] and kept[0][3]
    assert sorted(p[0] for p in kept if p[0] < 1.0) == sorted(p[0] for p in source if p[0] < 1.0)
    assert decode_audio(str(cut))[2] == 1.0


def packets_in_flight(path: Path, end_seconds: float | None) -> list[int]:
    """For each packet the copy passes on: how many packets it has read but not passed on yet."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        read = 0

        def counted():
            nonlocal read
            for packet in container.demux(stream):
                read += 1
                yield packet

        end_pts = None if end_seconds is None else round(end_seconds / stream.time_base)
        return [read - passed for passed, _ in enumerate(_packets_to_keep(counted(), end_pts), start=1)]


def test_mux_streams_packets_as_they_are_demuxed(tmp_path: Path) -> None:
    """The copy holds a few packets at a time, never the whole stream: each packet of a whole copy is passed
    on as soon as it is read, and a cut holds back only the B-frame anchors it may still need."""
    upload = make_video(tmp_path / "upload.mp4", 4.0, 25, size=(160, 96))
    whole = packets_in_flight(upload, None)
    assert len(whole) == 100 and set(whole) == {0}
    cut = packets_in_flight(upload, 2.0)
    assert 50 <= len(cut) <= 52 and max(cut) <= 3
