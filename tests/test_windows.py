"""Long requests as windows (model.windows, Pipeline's windowed path) on the tiny preset.

The pipeline here uses 3 s windows overlapping by 1 s so that requests of a few seconds have several windows
(the code is the same as for 8 s windows, whose plans are checked without generating).
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from model.build import tiny_pipeline
from model.pipeline import Cancelled, Pipeline, StepDetail
from model.request import GenerationRequest
from model.sequence import AUDIO_16K, AUDIO_44K, CLIP_FPS, SequenceLengths
from model.testkit import make_vfr_video, make_video
from model.video import VideoStream, load_video
from model.windows import equal_power_ramps, join_waveforms, overlap_latents, plan_windows, window_noise

VARIANT = "small_16k"
SAMPLES_PER_LATENT = AUDIO_16K.hop * 2


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return tiny_pipeline(VARIANT, window_duration=3.0, window_overlap=1.0, window_schedule="sequential")


@pytest.fixture(scope="module")
def batched() -> Pipeline:
    return tiny_pipeline(VARIANT, window_duration=3.0, window_overlap=1.0, window_schedule="batched")


def request(**overrides) -> GenerationRequest:
    return replace(GenerationRequest(prompt="rain on a roof", duration=6.0, num_steps=2), **overrides)


@pytest.mark.parametrize("audio", [AUDIO_16K, AUDIO_44K], ids=["16k", "44k"])
@pytest.mark.parametrize("duration", [8.5, 20.04, 60.0, 599.97])
def test_plans_cover_the_request_on_whole_seconds(audio, duration: float) -> None:
    windows = plan_windows(duration, audio)
    rate = audio.sampling_rate / audio.hop / 2  # latents per second
    total = SequenceLengths.for_duration(duration, audio)
    assert windows[0].latent_start == 0 and windows[-1].latent_end == total.latent
    assert windows[-1].start + windows[-1].duration == pytest.approx(duration)
    full = SequenceLengths.for_duration(8.0, audio)
    for w in windows[:-1]:
        assert w.duration == 8.0 and w.lengths == full
    for left, right in itertools.pairwise(windows):
        assert right.start - left.start == 6
        own, theirs = overlap_latents(right, left)
        # 2 s of latents, give or take the rounding of each start to its nearest latent
        assert abs((own.stop - own.start) - 2 * rate) <= 1.5
        assert own.start == 0 and theirs.stop == left.lengths.latent
    # audio starts within half a latent of the window's video time
    assert all(abs(w.latent_start / rate - w.start) <= 0.5 / rate + 1e-9 for w in windows)


def test_a_request_that_fits_is_one_window() -> None:
    for duration in (1.0, 7.99, 8.0):
        (window,) = plan_windows(duration, AUDIO_44K)
        assert window.lengths == SequenceLengths.for_duration(duration, AUDIO_44K)
    with pytest.raises(ValueError, match="whole number of seconds"):
        plan_windows(20.0, AUDIO_44K, overlap=1.5)
    with pytest.raises(ValueError, match="whole number of seconds"):
        plan_windows(20.0, AUDIO_44K, overlap=4.0)  # a window pinned at both ends would be all pins


def test_the_crossfade_is_equal_power() -> None:
    fade_out, fade_in = equal_power_ramps(1000)
    torch.testing.assert_close(fade_out**2 + fade_in**2, torch.ones(1000))
    assert fade_out[0] > 0.99 and fade_in[-1] > 0.99 and (fade_out.diff() < 0).all()
    windows = plan_windows(20.0, AUDIO_16K)
    waves = [torch.full((1, w.lengths.latent * SAMPLES_PER_LATENT), float(w.index + 1)) for w in windows]
    joined = join_waveforms(windows, waves, SAMPLES_PER_LATENT)
    assert joined.shape == (1, windows[-1].latent_end * SAMPLES_PER_LATENT)
    start = windows[1].latent_start * SAMPLES_PER_LATENT
    end = windows[0].lengths.latent * SAMPLES_PER_LATENT
    fade_out, fade_in = equal_power_ramps(end - start)
    torch.testing.assert_close(joined[0, start:end], 1 * fade_out + 2 * fade_in)
    assert (joined[0, :start] == 1).all() and (joined[0, end : end + 100] == 2).all()


def test_window_zero_draws_the_single_pass_noise(pipe: Pipeline) -> None:
    single = pipe.prepare(request(duration=3.0, seed=5, num_samples=2))
    first = window_noise(5, 0, 2, single.lengths, AUDIO_16K.latent_dim, pipe.device, pipe.dtype)
    assert torch.equal(first, pipe.initial_noise([single]))
    second = window_noise(5, 1, 2, single.lengths, AUDIO_16K.latent_dim, pipe.device, pipe.dtype)
    assert not torch.allclose(first, second)


def test_a_request_of_one_window_takes_the_single_pass_path(tmp_path: Path) -> None:
    """Default 8 s windows: 'the whole video' of a short video is today's request for its length, exactly."""
    default = tiny_pipeline(VARIANT)
    video = make_video(tmp_path / "short.mp4", seconds=1.0, fps=25, size=(96, 64))
    whole = default.prepare(request(video=video, duration=None, num_steps=1))
    asked = default.prepare(request(video=video, duration=1.0, num_steps=1))
    assert not whole.windowed and whole.stream is None and whole.duration == asked.duration
    assert torch.equal(whole.frames.clip_u8, asked.frames.clip_u8)
    assert torch.equal(whole.frames.sync_u8, asked.frames.sync_u8)
    (a,), (b,) = default.generate_prepared([whole]), default.generate_prepared([asked])
    assert torch.equal(a.audio, b.audio) and "windows" not in a.metadata
    text = default.prepare(request(duration=8.0))
    assert not text.windowed


def pinned_overlaps_agree(inputs, latents) -> None:
    windows = inputs.windows
    for left, right in itertools.pairwise(windows):
        own, theirs = overlap_latents(right, left)
        assert torch.equal(latents[right.index][:, own], latents[left.index][:, theirs])


@pytest.mark.parametrize("schedule", ["sequential", "batched"])
def test_neighbours_share_their_pinned_latents(pipe: Pipeline, batched: Pipeline, schedule: str) -> None:
    pipeline = pipe if schedule == "sequential" else batched
    prepared = pipeline.prepare(request(duration=9.0, num_samples=2))
    inputs = pipeline.window_inputs(prepared)
    assert [w.start for w in inputs.windows] == [0, 2, 4, 6]
    assert len({w.lengths for w in inputs.windows}) == 1  # 4 full windows: one batch per pass when batched
    seen: list[StepDetail] = []
    latents = pipeline.sample_windows(prepared.request, inputs, lambda stage, f, detail: seen.append(detail))
    pinned_overlaps_agree(inputs, latents)
    assert seen[-1] == StepDetail(4, 4, 2, 2)
    if schedule == "batched":  # two passes: windows 1 and 3 together, then 2 and 4
        assert [d.window for d in seen] == [1, 2, 2, 4, 4]
    else:
        assert [(d.window, d.step) for d in seen[1:]] == [(w, s) for w in (1, 2, 3, 4) for s in (1, 2)]


def test_seeds_reproduce(pipe: Pipeline) -> None:
    def latents(seed: int) -> list[torch.Tensor]:
        prepared = pipe.prepare(request(seed=seed))
        return pipe.sample_windows(prepared.request, pipe.window_inputs(prepared))

    a, b, c = latents(3), latents(3), latents(4)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.allclose(a[1], c[1])


def test_cancel_stops_in_the_middle_of_a_window(pipe: Pipeline) -> None:
    seen: list[StepDetail] = []

    def cancel_in_window_two(stage: str, fraction: float, detail: StepDetail | None) -> None:
        if detail is not None:
            seen.append(detail)
            if detail.window == 2 and detail.step == 1:
                raise Cancelled

    with pytest.raises(Cancelled):
        pipe.generate(request(num_steps=3), progress=cancel_in_window_two)
    assert seen[-1] == StepDetail(2, 3, 1, 3)


@pytest.mark.parametrize("schedule", ["sequential", "batched"])
def test_both_schedules_give_the_whole_length(pipe: Pipeline, batched: Pipeline, schedule: str) -> None:
    pipeline = pipe if schedule == "sequential" else batched
    result = pipeline.generate(request(duration=5.5))
    assert result.audio.shape == (1, int(5.5 * 16000)) and torch.isfinite(result.audio).all()
    assert result.metadata["windows"] == {"count": 3, "overlap": 1.0, "schedule": schedule, "starts": [0, 2, 4]}
    assert result.duration == 5.5


@pytest.fixture(scope="module")
def lossless(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A lossless 24 fps video and the same video cut at 2 s and at 4 s (windows 1 and 2): same pixels.

    At 24 fps no frame but those on whole seconds falls on a 25 fps sync tick, where the official picker's
    running float sum of ticks decides (a cut at another frame time could differ by one frame there)."""
    folder = tmp_path_factory.mktemp("lossless")
    for start in (2, 4):
        make_video(
            folder / f"from{start}.mkv",
            seconds=5.5 - start,
            fps=24,
            size=(96, 64),
            codec="ffv1",
            first_frame=24 * start,
        )
    return make_video(folder / "whole.mkv", seconds=5.5, fps=24, size=(96, 64), codec="ffv1")


def test_a_window_reads_the_frames_of_the_video_cut_at_its_start(pipe: Pipeline, lossless: Path) -> None:
    prepared = pipe.prepare(request(video=lossless, duration=None))
    assert prepared.windowed and prepared.stream is not None and prepared.frames is None
    inputs = pipe.window_inputs(prepared)
    # 132 frames: 44 CLIP ticks (5.5 s) and 137 sync ticks (5.48 s) up to the last frame at 5.458 s
    assert inputs.duration == pytest.approx(5.48) and [w.start for w in inputs.windows] == [0, 2, 4]
    for window in inputs.windows[1:]:
        cut = pipe.prepare(request(video=lossless.with_name(f"from{window.start}.mkv"), duration=window.duration))
        assert not cut.windowed and cut.duration == pytest.approx(window.duration)
        assert (cut.lengths.clip, cut.lengths.sync) == (window.lengths.clip, window.lengths.sync)
        features = pipe.encode([cut])
        torch.testing.assert_close(inputs.clip[window.index], features.clip[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(inputs.sync[window.index], features.sync[0], rtol=1e-5, atol=1e-5)
    # the same frames: the whole video's CLIP frames from 2 s on are the cut video's
    whole = tiny_pipeline(VARIANT).prepare(request(video=lossless, duration=5.5)).frames
    cut = tiny_pipeline(VARIANT).prepare(request(video=lossless.with_name("from2.mkv"), duration=3.5)).frames
    assert torch.equal(whole.clip_u8[2 * CLIP_FPS :], cut.clip_u8)


def test_a_long_video_generates_its_whole_length(pipe: Pipeline, lossless: Path) -> None:
    result = pipe.generate(request(video=lossless, duration=None))
    assert result.duration == pytest.approx(5.48) and result.audio.shape == (1, int(result.duration * 16000))
    assert result.metadata["mode"] == "video" and result.metadata["windows"]["count"] == 3


def test_windows_opened_past_the_plan_are_dropped(pipe: Pipeline, tmp_path: Path) -> None:
    """7 s of video at 25 fps (6.96 s of sync ticks): windows at 0, 2 and 4 s, the last one 2.96 s long; the
    stream also opened one at 6 s, which the plan does not need."""
    video = make_video(tmp_path / "seven.mp4", seconds=7.0, fps=25, size=(96, 64))
    inputs = pipe.window_inputs(pipe.prepare(request(video=video, duration=None)))
    assert [w.start for w in inputs.windows] == [0, 2, 4] and inputs.windows[-1].duration < 3
    for w in inputs.windows:
        assert inputs.sync[w.index].shape[0] == w.lengths.sync and inputs.clip[w.index].shape[0] == w.lengths.clip


@pytest.fixture(scope="module")
def paused(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8.95 s of variable-rate video whose 300 ms frames span the ends of windows 0, 1 and 2 (3, 5 and 7 s).

    Every frame time is an odd multiple of 10 ms, so none meets a 25 fps tick of any window: a window's picks
    are then the whole video's picks over its span, whichever running sum timed them."""
    frame_ms = [10] + [40] * 70 + ([300] + [40] * 43) * 2 + [300] + [40] * 45
    return make_vfr_video(tmp_path_factory.mktemp("paused") / "paused.mp4", frame_ms, size=(96, 64))


def test_a_pause_across_a_windows_end_still_fills_the_window(paused: Path) -> None:
    """The first frame after the window's end stands for the ticks the window still had due before it."""
    whole = load_video(paused, 20.0).sync_u8
    stream = VideoStream(paused, 20.0, sync_windows=(2, 3.0))
    windows = dict(w for _, _, complete in stream for w in complete)
    assert sorted(windows) == [0, 1, 2, 3, 4]  # one opened at 8 s, past the plan
    for index in (0, 1, 2):  # each completed by its pause's far frame
        frames = windows[index]
        assert len(frames) >= SequenceLengths.for_duration(3.0, AUDIO_16K).sync_frames
        start = 2 * 25 * index
        assert torch.equal(torch.stack(frames), whole[start : start + len(frames)])


def test_a_variable_rate_video_generates_its_whole_length(pipe: Pipeline, paused: Path) -> None:
    inputs = pipe.window_inputs(pipe.prepare(request(video=paused, duration=None)))
    assert [w.start for w in inputs.windows] == [0, 2, 4, 6]
    for w in inputs.windows:
        assert inputs.sync[w.index].shape[0] == w.lengths.sync and inputs.clip[w.index].shape[0] == w.lengths.clip
    result = pipe.generate(request(video=paused, duration=None, num_steps=1))
    # the last frame at 8.91 s: 223 sync ticks, 8.92 s
    assert result.duration == pytest.approx(8.92) and result.audio.shape == (1, int(result.duration * 16000))
