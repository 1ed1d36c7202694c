"""The composed pipeline on the tiny preset: modes, batching, durations, seeds, cancellation, file loading."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from model.build import Architecture, load_pipeline, pipeline_from_files, tiny_pipeline
from model.checkpoint import CheckpointError
from model.pipeline import Cancelled, Pipeline, StepDetail
from model.recipe import synth_module_state_dict
from model.request import GenerationRequest
from model.testkit import make_image, make_video
from model.vae import VAEDecoder
from model.vocoder import BigVGAN
from model.weights.manifest import paths_for

VARIANT = "small_16k"  # 16 kHz: the cheapest vocoder, the same code paths as 44k


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return tiny_pipeline(VARIANT)


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_video(tmp_path_factory.mktemp("media") / "clip.mp4", seconds=3.0, fps=24, size=(160, 120))


def request(**overrides) -> GenerationRequest:
    return replace(GenerationRequest(prompt="rain on a roof", duration=1.0, num_steps=3), **overrides)


def test_video_to_audio_result_and_metadata(pipe: Pipeline, video: Path) -> None:
    result = pipe.generate(request(video=video, duration=1.5))
    assert result.sample_rate == 16000
    assert result.duration == pytest.approx(1.5)
    assert result.audio.shape == (1, 24000) and result.audio.dtype == torch.float32
    assert torch.isfinite(result.audio).all() and result.audio.abs().max() <= 1.0
    meta = result.metadata
    assert meta["mode"] == "video" and meta["variant"] == VARIANT and meta["seed"] == 42
    assert meta["weights"]["kind"] == "tiny" and meta["weights"]["random_weights"] is True
    assert "random weights" in meta["weights"]["note"]
    assert meta["sequence_lengths"] == {"latent": 47, "clip": 12, "sync": 24}
    assert {"video", "clip", "sync", "text", "sampling", "vae", "vocoder", "total"} <= set(meta["timings"])


def test_short_video_shortens_the_duration(pipe: Pipeline, video: Path) -> None:
    result = pipe.generate(request(video=video, duration=10.0))
    assert result.duration <= 3.0
    assert result.audio.shape[1] == int(result.duration * 16000)


def test_modes_differ_and_are_labelled(pipe: Pipeline, video: Path, tmp_path: Path) -> None:
    image = make_image(tmp_path / "still.png")
    results = {
        "video": pipe.generate(request(video=video)),
        "masked": pipe.generate(request(video=video, mask_away_clip=True)),
        "image": pipe.generate(request(image=image)),
        "text": pipe.generate(request()),
    }
    assert [r.metadata["mode"] for r in results.values()] == ["video", "video", "image", "text"]
    audios = [r.audio for r in results.values()]
    for i in range(len(audios)):
        for j in range(i + 1, len(audios)):
            assert not torch.equal(audios[i], audios[j])


def test_same_seed_same_audio_other_seed_other_audio(pipe: Pipeline) -> None:
    a, b, c = (pipe.generate(request(seed=s)).audio for s in (7, 7, 8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_durations_are_not_state_of_the_model(pipe: Pipeline, video: Path) -> None:
    short, long = request(video=video, duration=1.0), request(video=video, duration=2.0)
    first = pipe.generate(short).audio
    pipe.generate(long)
    assert torch.equal(pipe.generate(short).audio, first)
    assert tiny_pipeline(VARIANT).generate(long).audio.shape == (1, 32000)


def test_a_batch_equals_requests_run_alone(pipe: Pipeline, video: Path) -> None:
    requests = [
        request(video=video, seed=1),
        request(prompt="a dog barks", seed=2, cfg_strength=2.0),
        request(duration=2.0, seed=3),  # another length: its own group
        request(prompt="", negative_prompt=None, seed=4, num_samples=2, cfg_strength=0.5),
    ]
    batched = pipe.generate_batch(requests)
    assert [r.metadata["batch_size"] for r in batched] == [3, 3, 1, 3]
    for req, together in zip(requests, batched, strict=True):
        alone = pipe.generate(req)
        assert together.audio.shape == alone.audio.shape
        torch.testing.assert_close(together.audio, alone.audio, atol=1e-4, rtol=1e-4)


def test_num_samples_draws_distinct_samples(pipe: Pipeline) -> None:
    result = pipe.generate(request(num_samples=3))
    assert result.audio.shape == (3, 16000)
    assert not torch.equal(result.audio[0], result.audio[1])


def test_progress_reports_every_step_and_can_cancel(pipe: Pipeline) -> None:
    seen: list[tuple[str, float, StepDetail | None]] = []
    pipe.generate(request(num_steps=4), progress=lambda *report: seen.append(report))
    assert [f for s, f, _ in seen if s == "sampling"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert [d.step for s, _, d in seen if s == "sampling"] == [0, 1, 2, 3, 4]
    assert {(d.window, d.windows, d.steps) for s, _, d in seen if s == "sampling"} == {(1, 1, 4)}
    assert seen[-1] == ("decoding", 1.0, None)

    def cancel_at_half(stage: str, fraction: float, detail: StepDetail | None) -> None:
        if stage == "sampling" and fraction >= 0.5:
            raise Cancelled

    with pytest.raises(Cancelled):
        pipe.generate(request(num_steps=4), progress=cancel_at_half)


def test_bad_requests_are_refused(pipe: Pipeline, video: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not both"):
        pipe.generate(request(video=video, image=make_image(tmp_path / "x.png")))
    for bad in (request(duration=0.0), request(num_steps=0), request(num_samples=0), request(duration=0.3)):
        with pytest.raises(ValueError):
            pipe.generate(bad)


def _write_official_files(arch: Architecture, pipe_seed: int, weights_dir: Path) -> None:
    """The tiny preset's weights written in the official files' formats and layout."""
    paths = paths_for(VARIANT, weights_dir)
    for path in (paths.flow, paths.clip):
        path.parent.mkdir(parents=True, exist_ok=True)
    reference = tiny_pipeline(VARIANT, seed=pipe_seed)
    flow = {k: v.clone() for k, v in reference.flow.state_dict().items()}
    torch.save(flow, paths.flow)
    torch.save(dict(reference.clip.clip.state_dict()), paths.clip)
    paths.clip_config.write_text(json.dumps({"model_cfg": arch.clip.model_cfg}))
    synchformer = {f"vfeat_extractor.{k}": v for k, v in reference.synchformer.state_dict().items()}
    synchformer["afeat_extractor.extra.weight"] = torch.zeros(3)  # the official file's other branches
    torch.save(synchformer, paths.synchformer)
    vae = synth_module_state_dict(VAEDecoder(arch.vae), pipe_seed)
    torch.save({**vae, "encoder.conv_in.weight": torch.zeros(4, 4, 3)}, paths.vae)  # encoder keys are ignored
    vocoder = synth_module_state_dict(BigVGAN(arch.vocoder), pipe_seed)
    torch.save({"generator": legacy_weight_norm_names(vocoder)}, paths.vocoder)


def legacy_weight_norm_names(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """weight_g / weight_v, as NVIDIA's BigVGAN files name them."""
    renames = (("parametrizations.weight.original0", "weight_g"), ("parametrizations.weight.original1", "weight_v"))
    out = {}
    for key, value in state_dict.items():
        for new, old in renames:
            key = key.replace(new, old)
        out[key] = value
    return out


def test_official_files_load_into_the_same_pipeline(tmp_path: Path, pipe: Pipeline) -> None:
    arch = Architecture.tiny(VARIANT)
    _write_official_files(arch, 0, tmp_path)
    loaded = pipeline_from_files(arch, paths_for(VARIANT, tmp_path), {"kind": "official", "random_weights": True})
    req = request(num_steps=2)
    torch.testing.assert_close(loaded.generate(req).audio, pipe.generate(req).audio, atol=1e-5, rtol=1e-5)


def test_a_damaged_checkpoint_names_its_keys(tmp_path: Path) -> None:
    arch = Architecture.tiny(VARIANT)
    _write_official_files(arch, 0, tmp_path)
    paths = paths_for(VARIANT, tmp_path)
    flow = torch.load(paths.flow)
    del flow["final_layer.conv.weight"]
    flow["fused_blocks.0.attn.qkv.weight"] = flow["fused_blocks.0.attn.qkv.weight"][:-1]
    flow["made_up.weight"] = torch.zeros(1)
    torch.save(flow, paths.flow)
    with pytest.raises(CheckpointError) as err:
        pipeline_from_files(arch, paths, {"kind": "official", "random_weights": True})
    message = str(err.value)
    assert "final_layer.conv.weight" in message and "made_up.weight" in message
    assert "fused_blocks.0.attn.qkv.weight" in message and str(paths.flow) in message


def test_missing_official_files_say_what_to_download(tmp_path: Path) -> None:
    from model.weights.verification import WeightsMissingError

    with pytest.raises(WeightsMissingError) as err:
        load_pipeline(VARIANT, weights="official", weights_dir=tmp_path, device="cpu")
    assert "mmaudio_small_16k.pth" in str(err.value) and "python -m model.weights download" in str(err.value)
