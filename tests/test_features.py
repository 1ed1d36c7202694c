"""Behaviour of the feature extractors (Synchformer, CLIP) with tiny configs and deterministic random weights."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import open_clip
import pytest
import torch

from model.checkpoint import CheckpointError, check_keys
from model.clip import ClipConfig, ClipEncoder
from model.recipe import manifest_of, synth_state_dict
from model.synchformer import (
    UNUSED_PREFIXES,
    VISUAL_PREFIX,
    Synchformer,
    SynchformerConfig,
)

MANIFESTS = Path(__file__).parent / "reference" / "manifests"
SOT, EOT = 49406, 49407


def meta_state_dict(manifest_name: str) -> dict[str, torch.Tensor]:
    keys = json.loads((MANIFESTS / manifest_name).read_text())["keys"]
    return {k: torch.empty(shape, device="meta") for k, (shape, _) in keys.items()}


# ------------------------------------------------------------------------------------------------
# Synchformer


def official_synchformer_file(config: SynchformerConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict laid out like the official file: the visual branch under its prefix, plus the rest."""
    visual = synth_state_dict(manifest_of(Synchformer(config).state_dict()), seed)
    patch = config.patch_size
    unused_2d_patch_embed = {"patch_embed.proj.weight": torch.zeros(config.dim, 3, patch, patch)}
    return {
        **{VISUAL_PREFIX + k: v for k, v in {**visual, **unused_2d_patch_embed}.items()},
        "afeat_extractor.conv.weight": torch.zeros(4, 4),
        "transformer.blocks.0.weight": torch.zeros(4),
    }


@pytest.fixture(scope="module")
def sync_model() -> Synchformer:
    return Synchformer.from_state_dict(SynchformerConfig.tiny(), official_synchformer_file(SynchformerConfig.tiny()))


def sync_video(batch: int, frames: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, frames, 3, 224, 224, generator=gen) * 2 - 1


def test_synchformer_config_matches_the_official_checkpoint() -> None:
    with torch.device("meta"):
        model = Synchformer(SynchformerConfig())
    official = {k.removeprefix(VISUAL_PREFIX): v for k, v in meta_state_dict("synchformer.json").items()}
    check_keys(model, official, "synchformer.json", ignore_prefixes=UNUSED_PREFIXES)
    assert SynchformerConfig().time_steps == 8


@pytest.mark.parametrize(("batch", "frames"), [(1, 16), (2, 23), (1, 31)])
def test_encode_video_shapes(sync_model: Synchformer, batch: int, frames: int) -> None:
    segments = (frames - 16) // 8 + 1
    out = sync_model.encode_video(sync_video(batch, frames))
    assert out.shape == (batch, segments * 8, 64)
    assert torch.isfinite(out).all()


def test_encode_video_is_segment_major_over_windows_of_16_every_8(sync_model: Synchformer) -> None:
    video = sync_video(2, 25)  # 2 windows; frame 24 is left over
    out = sync_model.encode_video(video)
    windows = torch.stack([video[:, :16], video[:, 8:24]], dim=1)
    per_segment = sync_model.encode_segments(windows)
    assert per_segment.shape == (2, 2, 8, 64)
    torch.testing.assert_close(out, per_segment.flatten(1, 2), atol=1e-5, rtol=1e-5)


def test_encode_video_chunked_equals_one_batch(sync_model: Synchformer) -> None:
    video = sync_video(1, 32)  # 3 segments: chunks of 2 + 1
    whole = sync_model.encode_video(video)
    torch.testing.assert_close(sync_model.encode_video(video, chunk_size=2), whole, atol=1e-5, rtol=1e-5)


def test_synchformer_sees_time_order(sync_model: Synchformer) -> None:
    video = sync_video(1, 16)
    assert (sync_model.encode_video(video) - sync_model.encode_video(video.flip(1))).abs().max() > 1e-3


def test_synchformer_rejects_bad_inputs(sync_model: Synchformer) -> None:
    with pytest.raises(ValueError, match="at least 16 frames"):
        sync_model.encode_video(sync_video(1, 15))
    with pytest.raises(ValueError, match="224"):
        sync_model.encode_video(torch.zeros(1, 16, 3, 256, 256))


def test_synchformer_file_with_extra_keys_loads(tmp_path: Path, sync_model: Synchformer) -> None:
    path = tmp_path / "synchformer_state_dict.pth"
    torch.save(official_synchformer_file(SynchformerConfig.tiny()), path)
    loaded = Synchformer.from_file(SynchformerConfig.tiny(), path).state_dict()
    expected = sync_model.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_synchformer_checkpoint_errors_name_the_keys() -> None:
    config = SynchformerConfig.tiny()
    sd = official_synchformer_file(config)
    sd[VISUAL_PREFIX + "blocks.1.timeattn.qkv.weight"] = torch.zeros(5, 64)
    del sd[VISUAL_PREFIX + "temp_embed"]
    with pytest.raises(CheckpointError) as err:
        Synchformer.from_state_dict(config, sd)
    assert "blocks.1.timeattn.qkv.weight [5, 64] != [192, 64]" in str(err.value)
    assert err.value.missing == ["temp_embed"]
    with pytest.raises(CheckpointError, match="missing"):
        Synchformer.from_state_dict(config, {"transformer.x": torch.zeros(1)})


def test_synchformer_runs_in_bfloat16(sync_model: Synchformer) -> None:
    video = sync_video(1, 16)
    reference = sync_model.encode_video(video)
    out = copy.deepcopy(sync_model).to(torch.bfloat16).encode_video(video)
    assert out.dtype == torch.bfloat16 and out.shape == reference.shape
    assert (out.float() - reference).norm() / reference.norm() < 3e-2


# ------------------------------------------------------------------------------------------------
# CLIP


@pytest.fixture(scope="module")
def clip_weights() -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = open_clip.CLIP(**ClipConfig.tiny().model_cfg)
    return synth_state_dict(manifest_of(model.state_dict()), seed=1)


@pytest.fixture(scope="module")
def clip_model(clip_weights: dict[str, torch.Tensor]) -> ClipEncoder:
    return ClipEncoder.from_state_dict(ClipConfig.tiny(), clip_weights)


def clip_frames(batch: int, frames: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, frames, 3, 384, 384, generator=torch.Generator().manual_seed(seed))


def test_dfn5b_config_matches_the_official_checkpoint() -> None:
    manifest = json.loads((MANIFESTS / "clip_dfn5b_vit_h_14_384.json").read_text())
    assert ClipConfig.from_open_clip(manifest["open_clip_config"]) == ClipConfig()
    with torch.device("meta"):
        model = open_clip.CLIP(**ClipConfig().model_cfg)
    check_keys(model, meta_state_dict("clip_dfn5b_vit_h_14_384.json"), "clip manifest")


@pytest.mark.parametrize(("batch", "frames"), [(1, 1), (2, 2)])
def test_encode_images_shapes_and_unit_norm(clip_model: ClipEncoder, batch: int, frames: int) -> None:
    out = clip_model.encode_images(clip_frames(batch, frames))
    assert out.shape == (batch, frames, 64)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(batch, frames))


def test_encode_images_chunked_equals_one_batch(clip_model: ClipEncoder) -> None:
    images = clip_frames(1, 3)
    whole = clip_model.encode_images(images)
    torch.testing.assert_close(clip_model.encode_images(images, chunk_size=2), whole, atol=1e-6, rtol=1e-5)


def test_encode_images_ignores_the_last_six_pixels(clip_model: ClipEncoder) -> None:
    images = clip_frames(1, 1)
    reference = clip_model.encode_images(images)
    edited = images.clone()
    edited[..., 378:, :] = 0.0
    edited[..., :, 378:] = 1.0
    torch.testing.assert_close(clip_model.encode_images(edited), reference)
    edited[..., 377, 0] = 1.0 - edited[..., 377, 0]  # inside the last patch row: must matter
    assert (clip_model.encode_images(edited) - reference).abs().max() > 1e-6


def test_encode_images_rejects_other_sizes(clip_model: ClipEncoder) -> None:
    with pytest.raises(ValueError, match="384"):
        clip_model.encode_images(torch.zeros(1, 1, 3, 378, 378))


def test_tokenizer_follows_clip_bpe(clip_model: ClipEncoder) -> None:
    tokens = clip_model.tokenize(["", "A  Dog", "word " * 100])
    assert tokens.dtype == torch.int64 and tokens.shape == (3, 77)
    assert tokens[0, :2].tolist() == [SOT, EOT] and not tokens[0, 2:].any()
    # lower-cased, whitespace cleaned: "a" and "dog" are single BPE tokens
    assert tokens[1, :4].tolist() == [SOT, 320, 1929, EOT] and not tokens[1, 4:].any()
    # too long: cut to 77 with the end-of-text token kept last
    assert tokens[2, 0] == SOT and tokens[2, -1] == EOT and (tokens[2, 1:-1] != EOT).all()


def test_encode_text_all_positions_unit_norm_and_causal(clip_model: ClipEncoder) -> None:
    tokens = clip_model.tokenize(["rain on a tin roof", "rain on a wooden roof"])
    out = clip_model.encode_text(tokens)
    assert out.shape == (2, 77, 64)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2, 77))
    differ = int((tokens[0] != tokens[1]).nonzero()[0])
    torch.testing.assert_close(out[0, :differ], out[1, :differ])  # no position sees later tokens
    assert (out[0, differ:] - out[1, differ:]).abs().max() > 1e-4


def test_encode_text_of_empty_prompt_is_a_sequence(clip_model: ClipEncoder) -> None:
    out = clip_model.encode_prompts([""])
    assert out.shape == (1, 77, 64)
    # padding positions differ from each other only through their position embedding
    assert (out[0, 2] - out[0, 3]).abs().max() > 1e-4


def test_clip_loads_strictly_from_a_folder(tmp_path: Path, clip_weights: dict, clip_model: ClipEncoder) -> None:
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(clip_weights, path)  # like the hub file: no attn_mask entry
    loaded = ClipEncoder.from_file(ClipConfig.tiny(), path)
    assert all(torch.equal(v, clip_weights[k]) for k, v in loaded.clip.state_dict().items())
    tokens = loaded.tokenize(["hello"])
    torch.testing.assert_close(loaded.encode_text(tokens), clip_model.encode_text(tokens))


def test_clip_checkpoint_errors_name_the_keys(clip_weights: dict[str, torch.Tensor]) -> None:
    broken = dict(clip_weights)
    broken["visual.proj"] = torch.zeros(3, 3)
    del broken["ln_final.bias"]
    broken["visual.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        ClipEncoder.from_state_dict(ClipConfig.tiny(), broken)
    assert err.value.missing == ["ln_final.bias"]
    assert err.value.unexpected == ["visual.extra"]
    assert err.value.mismatched == ["visual.proj [3, 3] != [64, 64]"]


def test_clip_runs_in_bfloat16(clip_weights: dict[str, torch.Tensor], clip_model: ClipEncoder) -> None:
    bf16 = ClipEncoder.from_state_dict(ClipConfig.tiny(), clip_weights).to(torch.bfloat16)
    images = clip_frames(1, 1)
    image_features = bf16.encode_images(images)
    assert image_features.dtype == torch.bfloat16
    reference = clip_model.encode_images(images)
    assert (image_features.float() - reference).norm() / reference.norm() < 3e-2
    text = bf16.encode_prompts(["a bell rings"])
    assert text.dtype == torch.bfloat16 and torch.isfinite(text.float()).all()
