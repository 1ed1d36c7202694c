"""Video/image loading (official sampling and resizing) and upload probing, on media made by the tests."""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from model.media_errors import (
    CorruptMediaError,
    EmptyMediaError,
    MediaError,
    MediaTooLargeError,
    NoVideoStreamError,
    StillImageError,
    TruncatedMediaError,
    UnreadableMediaError,
    UnsupportedCodecError,
    VideoTooShortError,
)
from model.probe import ProbeLimits, mp4_video_codecs, probe_image, probe_video
from model.testkit import (
    make_audio_only,
    make_image,
    make_truncated,
    make_unknown_codec,
    make_video,
    official_frames,
)
from model.video import VideoStream, load_image, load_video


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("media")


@pytest.mark.parametrize(
    ("fps", "size", "seconds", "duration"),
    [
        (10, (250, 170), 2.0, 1.5),  # low fps (duplicates), odd size (crop offset 52.5 rounds to even), cut early
        (30, (180, 240), 1.0, 8.0),  # portrait, asked for more than the video has
        (24, (320, 240), 1.0, 1.0),
    ],
)
def test_exact_path_equals_the_official_pipeline(media: Path, fps, size, seconds, duration) -> None:
    path = make_video(media / f"oracle_{fps}_{size[0]}x{size[1]}.mp4", seconds, fps, size)
    official = official_frames(path, duration)
    video = load_video(path, duration)
    assert video.duration_sec == official.duration_sec
    assert torch.equal(video.clip_frames, official.clip)
    assert torch.equal(video.sync_frames, official.sync)
    assert (video.width, video.height) == size
    assert video.fps == fps


def run_lengths(frames: torch.Tensor) -> list[int]:
    """Lengths of runs of identical consecutive frames."""
    runs = [1]
    for previous, current in itertools.pairwise(frames):
        if torch.equal(previous, current):
            runs[-1] += 1
        else:
            runs.append(1)
    return runs


def test_low_fps_source_is_duplicated_at_25_fps_and_thinned_at_8(media: Path) -> None:
    video = load_video(make_video(media / "ten_fps.mp4", 2.0, 10), 2.0)
    # 20 frames at t = 0 .. 1.9 cover 48 sync ticks (0 .. 1.88 s) -> duration 48 / 25
    assert video.duration_sec == pytest.approx(1.92)
    assert video.sync_frames.shape == (48, 3, 224, 224)
    assert video.clip_frames.shape == (15, 3, 384, 384)  # int(8 * 1.92)
    sync_runs = run_lengths(video.sync_frames)
    # frame i covers the ticks in ((i - 1) / 10, i / 10]: 1 tick for frame 0, then 2 or 3 (2.5 on average)
    assert len(sync_runs) == 20 and sync_runs[0] == 1 and set(sync_runs[1:-1]) == {2, 3}
    assert run_lengths(video.clip_frames) == [1] * 15  # 8 fps picks distinct frames of a 10 fps source


def test_duration_is_clamped_to_the_frames_available(media: Path) -> None:
    # frames at t = 0 .. 0.95 cover 8 CLIP ticks (1.0 s) but only 24 sync ticks (0.96 s): sync decides
    video = load_video(make_video(media / "one_second.mp4", 1.0, 20), 8.0)
    assert video.duration_sec == 24 / 25
    assert video.clip_frames.shape[0] == 7 and video.sync_frames.shape[0] == 24  # int(8 * 0.96), int(25 * 0.96)


def test_value_ranges(media: Path) -> None:
    video = load_video(make_video(media / "ranges.mp4", 1.0, 25), 1.0)
    assert video.clip_frames.dtype == video.sync_frames.dtype == torch.float32
    assert video.clip_frames.min() >= 0 and video.clip_frames.max() <= 1
    assert -1 <= video.sync_frames.min() < 0 < video.sync_frames.max() <= 1


def red_share(image: torch.Tensor) -> torch.Tensor:
    """Per pixel: how much redder than green it is (the test pattern's marker is red, the rest is not)."""
    return image[0] - image[1]


@pytest.mark.parametrize("frame_path", ["exact", "fast"])
@pytest.mark.parametrize(("rotation", "corner"), [(90, "bottom-left"), (-90, "top-right"), (180, "bottom-right")])
def test_rotated_video_is_turned_to_display_orientation(media: Path, rotation, corner, frame_path) -> None:
    path = make_video(media / f"rotated_{rotation}.mp4", 0.5, 25, (320, 240), rotation=rotation)
    video = load_video(path, 0.5, frame_path=frame_path)
    expected_size = (240, 320) if rotation % 180 else (320, 240)
    assert (video.width, video.height) == expected_size
    for frame in (video.clip_frames[0], video.sync_frames[0]):
        n = frame.shape[-1]
        band = slice(0, n // 8), slice(n - n // 8, n)
        corners = {
            f"{v}-{h}": red_share(frame)[band[i], band[j]].mean()
            for i, v in enumerate(("top", "bottom"))
            for j, h in enumerate(("left", "right"))
        }
        assert max(corners, key=corners.get) == corner


def test_degenerate_display_matrix_counts_as_unrotated(media: Path) -> None:
    path = make_video(media / "zero_matrix.mp4", 0.5, 25, (320, 240), display_matrix=[0] * 9)
    assert probe_video(path).rotation == 0
    video = load_video(path, 0.5)
    assert (video.width, video.height) == (320, 240)


def test_fast_path_is_close_to_exact_on_large_frames(media: Path) -> None:
    path = make_video(media / "fast.mp4", 0.5, 25, (704, 400))  # short side above 384: the fast path applies
    exact, fast = load_video(path, 0.5), load_video(path, 0.5, frame_path="fast")
    assert fast.duration_sec == exact.duration_sec
    for a, b in ((exact.clip_u8, fast.clip_u8), (exact.sync_u8, fast.sync_u8)):
        assert a.shape == b.shape and not torch.equal(a, b)
        diff = (a.float() - b.float()).abs()
        # about a code on average; the big differences sit on the pattern's hard edges only
        assert diff.mean() < 2 and (diff > 16).float().mean() < 0.01


def test_fast_path_is_exact_on_small_frames(media: Path) -> None:
    path = make_video(media / "small.mp4", 0.5, 25, (320, 240))
    exact, fast = load_video(path, 0.5), load_video(path, 0.5, frame_path="fast")
    assert torch.equal(exact.clip_u8, fast.clip_u8) and torch.equal(exact.sync_u8, fast.sync_u8)


def test_unknown_frame_path_is_rejected(media: Path) -> None:
    with pytest.raises(ValueError, match="frame_path"):
        load_video(make_video(media / "any.mp4", 0.5, 25), 0.5, frame_path="nearest")


def test_very_short_video_gives_a_typed_error(media: Path) -> None:
    with pytest.raises(VideoTooShortError):
        load_video(make_video(media / "two_frames.mp4", 2 / 25, 25), 8.0)  # 1 CLIP frame, 2 sync -> 0.08 s


@pytest.mark.parametrize("suffix", ["png", "jpg", "webp"])
def test_image_gives_one_frame_of_each(media: Path, suffix) -> None:
    path = make_image(media / f"still.{suffix}", (300, 200))
    image = load_image(path, 4.0)
    assert image.clip_frames.shape == (1, 3, 384, 384)
    assert image.sync_frames.shape == (1, 3, 224, 224)
    assert image.duration_sec == 4.0 and image.fps == Fraction(1)
    assert (image.width, image.height) == (300, 200)
    if suffix == "png":  # lossless: must equal torchvision on the PIL array
        from PIL import Image

        rgb = torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1)[None]
        resized = v2.Resize((384, 384), v2.InterpolationMode.BICUBIC)(rgb)
        expected = v2.ToDtype(torch.float32, scale=True)(resized)
        assert torch.equal(image.clip_frames, expected)


def test_image_exif_orientation_is_applied(media: Path) -> None:
    from PIL import Image

    path = make_image(media / "exif.png", (300, 200))
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation 6: display turned 90 degrees clockwise
    Image.open(path).save(media / "exif.jpg", exif=exif)
    image = load_image(media / "exif.jpg", 1.0)
    assert (image.width, image.height) == (200, 300)
    frame = image.clip_frames[0]
    assert red_share(frame)[:48, -48:].mean() > 0.5  # the marker moved from top-left to top-right


# ---------------------------------------------------------------------------------------------
# probing uploads


def test_probe_describes_a_good_video(media: Path) -> None:
    info = probe_video(make_video(media / "probe.mp4", 2.0, 10, (320, 240), with_audio=True))
    assert info.duration_sec == pytest.approx(2.0)
    assert info.fps == 10
    assert (info.width, info.height, info.codec, info.rotation) == (320, 240, "h264", 0)
    assert info.has_video and info.has_audio


def test_probe_reports_display_size_of_a_rotated_video(media: Path) -> None:
    info = probe_video(make_video(media / "probe_rot.mp4", 0.5, 25, (320, 240), rotation=-90))
    assert (info.width, info.height, info.rotation) == (240, 320, 270)
    assert not info.has_audio


def bad_files(media: Path) -> dict[str, tuple[Path, type[MediaError]]]:
    good = make_video(media / "source.mp4", 2.0, 25, with_audio=True)
    good_faststart = make_video(media / "source_fs.mp4", 2.0, 25, with_audio=True, faststart=True)
    (media / "empty.mp4").write_bytes(b"")
    (media / "text.mp4").write_text("this is not a video\n" * 50)
    (media / "noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, np.uint8).tobytes())
    return {
        "empty": (media / "empty.mp4", EmptyMediaError),
        "text": (media / "text.mp4", UnreadableMediaError),
        "noise": (media / "noise.mp4", UnreadableMediaError),
        "truncated, index last": (make_truncated(media / "cut.mp4", good, 0.6), TruncatedMediaError),
        "truncated, index first": (make_truncated(media / "cut_fs.mp4", good_faststart, 0.6), TruncatedMediaError),
        "audio only": (make_audio_only(media / "audio.m4a"), NoVideoStreamError),
        "unknown codec": (make_unknown_codec(media / "unknown.mp4", good), UnsupportedCodecError),
    }


@pytest.fixture(scope="module")
def bad(media: Path) -> dict[str, tuple[Path, type[MediaError]]]:
    return bad_files(media)


@pytest.mark.parametrize(
    "kind", ["empty", "text", "noise", "truncated, index last", "truncated, index first", "audio only", "unknown codec"]
)
def test_probe_and_load_reject_bad_files_with_typed_errors(bad, kind) -> None:
    path, error = bad[kind]
    with pytest.raises(error) as caught:
        probe_video(path)
    assert path.name in str(caught.value)
    with pytest.raises(error):
        load_video(path, 1.0)


def test_probe_rejects_oversized_frames(media: Path) -> None:
    path = make_video(media / "wide.mp4", 0.2, 25, (640, 480))
    with pytest.raises(MediaTooLargeError):
        probe_video(path, ProbeLimits(max_width=320, max_height=320))


def test_probe_rejects_a_video_whose_frames_do_not_decode(media: Path) -> None:
    """Valid container, garbage payload: the H.264 samples are overwritten with noise."""
    path = make_video(media / "garbled.mp4", 1.0, 25, faststart=True)
    data = bytearray(path.read_bytes())
    start = data.index(b"mdat") + 4
    data[start:] = np.random.default_rng(1).integers(0, 256, len(data) - start, np.uint8).tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptMediaError):
        probe_video(path)


HOSTILE_FILE_SECONDS = 5.0  # generous on a busy 2-core machine: a clean 0.5 s clip takes a fraction of this


def test_hostile_files_give_media_errors_quickly(media: Path) -> None:
    """Damaged copies of a real upload: every outcome is a result or a MediaError, never another exception, each
    within HOSTILE_FILE_SECONDS."""
    rng = np.random.default_rng(7)
    sources = [
        make_video(media / f"fuzz_{index}.mp4", 0.5, 25, (160, 120), with_audio=True, faststart=faststart)
        for index, faststart in enumerate((False, True))
    ]
    for attempt in range(24):
        data = bytearray(sources[attempt % 2].read_bytes())
        start = int(rng.integers(0, len(data)))
        if attempt % 3 == 0:
            data = data[:start]
        else:
            size = int(rng.integers(1, 64))
            data[start : start + size] = rng.integers(0, 256, size, np.uint8).tobytes()
        path = media / "fuzzed.mp4"
        path.write_bytes(bytes(data))
        for load in (probe_video, lambda p: load_video(p, 0.5)):
            start_time = time.perf_counter()
            with contextlib.suppress(MediaError):  # anything else fails the test
                load(path)
            assert time.perf_counter() - start_time < HOSTILE_FILE_SECONDS, f"attempt {attempt} took too long"


@pytest.mark.parametrize("read", [probe_image, lambda p, **kw: load_image(p, 1.0, **kw)], ids=["probe", "load"])
def test_image_errors_are_the_same_for_probing_and_loading(media: Path, read: Callable[..., object]) -> None:
    with pytest.raises(MediaTooLargeError):
        read(make_image(media / "big.png", (640, 480)), limits=ProbeLimits(max_width=320, max_height=320))
    (media / "empty.png").write_bytes(b"")
    with pytest.raises(EmptyMediaError):
        read(media / "empty.png")
    (media / "not.png").write_bytes(os.urandom(1000))
    with pytest.raises(UnreadableMediaError):
        read(media / "not.png")
    whole = make_image(media / "whole.png").read_bytes()
    (media / "cut.png").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(TruncatedMediaError):
        read(media / "cut.png")


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_probe_refuses_a_still_image_as_video(media: Path, suffix: str) -> None:
    with pytest.raises(StillImageError):
        probe_video(make_image(media / f"still.{suffix}"))


def test_probe_accepts_bytes_after_a_complete_movie(media: Path) -> None:
    for faststart in (False, True):
        movie = make_video(media / f"whole{faststart}.mp4", seconds=1.0, faststart=faststart)
        padded = media / f"padded{faststart}.mp4"
        padded.write_bytes(movie.read_bytes() + b"trailing bytes a tool appended " * 20)
        assert probe_video(padded).duration_sec == pytest.approx(1.0, abs=0.05)
    cut = make_truncated(media / "cut_anyway.mp4", movie, keep=0.6)  # a real cut is still one
    with pytest.raises(TruncatedMediaError):
        probe_video(cut)


def test_probe_measures_a_stream_without_a_container(media: Path) -> None:
    raw = make_video(media / "raw.h264", seconds=3.0, fps=25, size=(320, 240))
    info = probe_video(raw)
    assert info.duration_sec == pytest.approx(3.0) and (info.width, info.height) == (320, 240)
    assert probe_video(raw, ProbeLimits(max_counted_seconds=1.0)).duration_sec == pytest.approx(1.04)
    with pytest.raises(MediaTooLargeError):
        probe_video(raw, ProbeLimits(max_width=100, max_height=100))
    # its frames carry no timestamps: timed by index, they are the frames of the same video in a container
    boxed = make_video(media / "boxed.mp4", seconds=3.0, fps=25, size=(320, 240))
    from_raw, from_mp4 = load_video(raw, 8.0), load_video(boxed, 8.0)
    assert from_raw.duration_sec == from_mp4.duration_sec
    assert torch.equal(from_raw.clip_u8, from_mp4.clip_u8) and torch.equal(from_raw.sync_u8, from_mp4.sync_u8)


def test_mp4_codecs_come_from_the_muxer() -> None:
    codecs = mp4_video_codecs()
    assert {"h264", "hevc", "av1", "vp9"} <= codecs and not {"vp8", "gif", "prores"} & codecs


def test_a_stream_hands_out_load_videos_frames_a_chunk_at_a_time(tmp_path: Path) -> None:
    video = make_video(tmp_path / "clip.mp4", seconds=3.0, fps=30, size=(96, 64))
    whole = load_video(video, 2.5)
    stream = VideoStream(video, 2.5, chunk=16)
    items = list(stream)
    assert len(items) >= 4 and all(max(len(c), len(s)) <= 16 + 2 for c, s, _ in items)
    assert stream.duration_sec == whole.duration_sec and stream.container_sec == pytest.approx(3.0)
    clip = torch.stack([f for c, _, _ in items for f in c])[: whole.clip_u8.shape[0]]
    sync = torch.stack([f for _, s, _ in items for f in s])[: whole.sync_u8.shape[0]]
    assert torch.equal(clip, whole.clip_u8) and torch.equal(sync, whole.sync_u8)


def test_window_sync_frames_are_picked_from_each_windows_start(tmp_path: Path) -> None:
    """Each window's sync frames are those of a request on the video cut at the window's start (a lossless
    24 fps video, whose frames meet the 25 fps ticks only on whole seconds)."""
    whole = make_video(tmp_path / "whole.mkv", seconds=4.0, fps=24, size=(64, 48), codec="ffv1")
    stream = VideoStream(whole, 4.0, chunk=8, sync_windows=(1, 2.0))
    windows = dict(w for _, _, complete in stream for w in complete)
    assert sorted(windows) == [0, 1, 2, 3] and not any(s for _, s, _ in stream)  # no whole-video sync frames
    for start in (1, 2):
        cut = make_video(
            tmp_path / f"cut{start}.mkv", seconds=2.0, fps=24, size=(64, 48), codec="ffv1", first_frame=24 * start
        )
        expected = load_video(cut, 2.0).sync_u8
        assert torch.equal(torch.stack(windows[start][: expected.shape[0]]), expected)
