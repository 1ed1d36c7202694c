"""VAE mel decoder and BigVGAN vocoders: shapes, checkpoint loading, constants, low precision (tiny configs)."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import TypeVar

import pytest
import torch

from model.checkpoint import CheckpointError
from model.recipe import synth_module_state_dict
from model.vae import VAE_16K, VAE_44K, VAEConfig, VAEDecoder
from model.vocoder import (
    BIGVGAN_16K,
    BIGVGAN_V2_44K,
    BigVGAN,
    VocoderConfig,
    lowpass_taps,
)

REFERENCE = Path(__file__).parent / "reference"
VAE_TINY = [VAE_16K.tiny(), VAE_44K.tiny()]
VOCODER_TINY = [BIGVGAN_16K.tiny(), BIGVGAN_V2_44K.tiny()]
Decoder = TypeVar("Decoder", VAEDecoder, BigVGAN)


@functools.cache
def tiny_decoder(build: type[Decoder], config: VAEConfig | VocoderConfig) -> tuple[Decoder, dict[str, torch.Tensor]]:
    """A loaded tiny VAE decoder or vocoder and its recipe state dict (seed 0, the module's own constants),
    shared by the tests (which must not modify them)."""
    state = synth_module_state_dict(build(config), 0)
    return build.from_state_dict(config, state), state


@pytest.mark.parametrize("config", VAE_TINY, ids=["16k", "44k"])
@torch.inference_mode()
def test_vae_decodes_latents_to_twice_as_many_mel_frames(config: VAEConfig) -> None:
    vae, _ = tiny_decoder(VAEDecoder, config)
    for length in (1, 7):
        mel = vae.decode(torch.randn(2, length, config.latent_dim))
        assert mel.shape == (2, config.n_mels, 2 * length)
        assert torch.isfinite(mel).all()


@torch.inference_mode()
def test_vae_batch_items_are_decoded_independently() -> None:
    vae, _ = tiny_decoder(VAEDecoder, VAE_TINY[0])
    latent = torch.randn(2, 9, VAE_TINY[0].latent_dim)
    torch.testing.assert_close(vae.decode(latent)[1:], vae.decode(latent[1:]))


@torch.inference_mode()
def test_vae_weights_are_forced_to_unit_norm_at_load() -> None:
    vae, state = tiny_decoder(VAEDecoder, VAE_TINY[0])
    raw, loaded = state["decoder.conv_in.weight"].flatten(1), vae.decoder.conv_in.weight.flatten(1)
    ones = torch.ones(raw.shape[0])
    assert not torch.allclose(raw.norm(dim=1), ones, atol=1e-2)
    torch.testing.assert_close(loaded.norm(dim=1), ones, atol=1e-3, rtol=0)
    # only the magnitude changes: each output channel keeps its direction
    torch.testing.assert_close(torch.nn.functional.cosine_similarity(raw, loaded), ones)


@torch.inference_mode()
def test_vae_mel_statistics_come_from_the_checkpoint() -> None:
    config = VAE_TINY[0]
    vae, state = tiny_decoder(VAEDecoder, config)
    latent = torch.randn(1, 5, config.latent_dim)
    plain = vae.decode(latent)
    mean, std = (
        torch.linspace(-3, 0, config.n_mels).view(1, -1, 1),
        torch.linspace(0.5, 2, config.n_mels).view(1, -1, 1),
    )
    shifted = VAEDecoder.from_state_dict(config, {**state, "data_mean": mean, "data_std": std})
    torch.testing.assert_close(shifted.decode(latent), plain * std + mean)


def test_vae_file_with_encoder_loads_and_bad_decoder_keys_are_named(tmp_path: Path) -> None:
    config = VAE_TINY[1]
    reference, state = tiny_decoder(VAEDecoder, config)
    encoder = {"encoder.conv_in.weight": torch.randn(8, config.n_mels, 3), "encoder.learnable_gain": torch.zeros(())}
    path = tmp_path / "v1-44.pth"
    torch.save({**encoder, **state}, path)
    vae = VAEDecoder.from_file(config, path)
    latent = torch.randn(1, 4, config.latent_dim)
    with torch.inference_mode():
        torch.testing.assert_close(vae.decode(latent), reference.decode(latent), rtol=0, atol=0)

    missing = {k: v for k, v in state.items() if k != "decoder.mid.attn_1.qkv.weight"}
    with pytest.raises(CheckpointError, match=r"missing: decoder\.mid\.attn_1\.qkv\.weight"):
        VAEDecoder.from_state_dict(config, {**encoder, **missing})
    misshaped = {**state, "decoder.conv_out.weight": torch.zeros(config.n_mels + 1, 8, 3)}
    with pytest.raises(CheckpointError, match=r"wrong shape: decoder\.conv_out\.weight"):
        VAEDecoder.from_state_dict(config, misshaped)
    with pytest.raises(CheckpointError, match=r"unexpected: decoder\.extra"):
        VAEDecoder.from_state_dict(config, {**state, "decoder.extra": torch.zeros(1)})


@pytest.mark.parametrize("config", VOCODER_TINY, ids=["16k", "44k"])
@torch.inference_mode()
def test_vocoder_gives_hop_samples_per_mel_frame(config: VocoderConfig) -> None:
    vocoder, _ = tiny_decoder(BigVGAN, config)
    for frames in (1, 5):
        audio = vocoder(torch.randn(2, config.n_mels, frames))
        assert audio.shape == (2, 1, frames * config.hop)
        assert torch.isfinite(audio).all() and audio.abs().max() <= 1


def test_tiny_vocoders_keep_the_official_rates() -> None:
    assert (BIGVGAN_16K.tiny().hop, BIGVGAN_16K.tiny().sampling_rate) == (256, 16000)
    assert (BIGVGAN_V2_44K.tiny().hop, BIGVGAN_V2_44K.tiny().sampling_rate) == (512, 44100)


@pytest.mark.parametrize("config", VOCODER_TINY, ids=["v1_16k", "v2_44k"])
@torch.inference_mode()
def test_v1_ends_with_biased_conv_and_tanh_v2_with_bias_free_conv_and_clamp(config: VocoderConfig) -> None:
    vocoder = copy.deepcopy(tiny_decoder(BigVGAN, config)[0])
    assert (vocoder.conv_post.bias is not None) == (config is VOCODER_TINY[0])
    vocoder.conv_post.weight *= 1000  # drive the last conv well past +-1
    captured = []
    vocoder.conv_post.register_forward_hook(lambda module, args, out: captured.append(out))
    audio = vocoder(torch.randn(1, config.n_mels, 1))
    before = captured[0]
    assert (before.abs() > 1.5).any()
    expected = torch.tanh(before) if config is VOCODER_TINY[0] else before.clamp(-1, 1)
    torch.testing.assert_close(audio, expected, rtol=0, atol=0)


@torch.inference_mode()
def test_vocoder_legacy_weight_norm_names_load_the_same() -> None:
    config = VOCODER_TINY[1]  # NVIDIA's v2 files use the legacy names
    vocoder, state = tiny_decoder(BigVGAN, config)
    legacy = {
        k.replace(".parametrizations.weight.original0", ".weight_g").replace(
            ".parametrizations.weight.original1", ".weight_v"
        ): v
        for k, v in state.items()
    }
    assert any(k.endswith(".weight_g") for k in legacy) and not any("parametrizations" in k for k in legacy)
    from_legacy = BigVGAN.from_state_dict(config, legacy)
    mel = torch.randn(1, config.n_mels, 2)
    torch.testing.assert_close(from_legacy(mel), vocoder(mel), rtol=0, atol=0)
    # weight norm is folded away after loading: plain conv weights at inference
    assert "conv_pre.weight" in vocoder.state_dict()
    assert not any("parametrizations" in k or k.endswith("weight_g") for k in vocoder.state_dict())


def test_vocoder_file_with_a_bad_key_names_it(tmp_path: Path) -> None:
    config = VOCODER_TINY[0]
    _, state = tiny_decoder(BigVGAN, config)
    path = tmp_path / "best_netG.pt"
    torch.save({"generator": state}, path)
    assert isinstance(BigVGAN.from_file(config, path), BigVGAN)
    key = "resblocks.4.convs2.1.parametrizations.weight.original1"
    torch.save({"generator": {k: v for k, v in state.items() if k != key}}, path)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        BigVGAN.from_file(config, path)


def test_filter_taps_match_the_official_constants() -> None:
    taps = lowpass_taps()
    assert taps.shape == (1, 1, 12) and taps.dtype == torch.float32
    torch.testing.assert_close(taps.sum(), torch.tensor(1.0))
    torch.testing.assert_close(taps, taps.flip(-1), rtol=0, atol=0)
    for case in ("16k", "44k"):
        fixture = torch.load(REFERENCE / "fixtures" / f"vocoder__{case}.pt", weights_only=True)
        constants = fixture["weights"]["constants"]
        assert constants and all(k.endswith(".filter") for k in constants)
        for value in constants.values():
            assert torch.equal(value, taps)
    assert all(torch.equal(v, taps) for k, v in BigVGAN(VOCODER_TINY[1]).state_dict().items() if k.endswith(".filter"))


def test_v2_config_json_gives_the_44k_config() -> None:
    manifest = json.loads((REFERENCE / "manifests" / "bigvgan_v2_44k.json").read_text())
    assert VocoderConfig.from_bigvgan_json(manifest["config_json"]) == BIGVGAN_V2_44K
    # a v1 file names the same fields, less the two output switches (absent: tanh and bias, as officially)
    v1_fields = {
        k: v for k, v in manifest["config_json"].items() if k not in ("use_bias_at_final", "use_tanh_at_final")
    }
    v1_fields.update(num_mels=80, sampling_rate=16000, upsample_rates=[4, 4, 2, 2, 2, 2])
    v1_fields.update(upsample_kernel_sizes=[8, 8, 4, 4, 4, 4])
    assert VocoderConfig.from_bigvgan_json(v1_fields) == BIGVGAN_16K
    with pytest.raises(ValueError, match="activation='snake'"):
        VocoderConfig.from_bigvgan_json({**manifest["config_json"], "activation": "snake"})


def test_full_size_vae_decoder_has_the_official_decoder_keys() -> None:
    # (the full-size vocoders are checked the same way by their parity fixtures, which load strictly)
    official = json.loads((REFERENCE / "manifests" / "vae_16k.json").read_text())["keys"]
    decoder_keys = {k: shape for k, (shape, _) in official.items() if not k.startswith("encoder.")}
    assert {k: list(v.shape) for k, v in VAEDecoder(VAE_16K).state_dict().items()} == decoder_keys


@torch.inference_mode()
def test_bfloat16_decode_and_vocode_track_float32() -> None:
    vae, vocoder = tiny_decoder(VAEDecoder, VAE_TINY[0])[0], tiny_decoder(BigVGAN, VOCODER_TINY[0])[0]
    latent = torch.randn(2, 3, VAE_TINY[0].latent_dim, generator=torch.Generator().manual_seed(0))
    mel = vae.decode(latent)
    audio = vocoder(mel)
    mel_bf16 = copy.deepcopy(vae).to(torch.bfloat16).decode(latent.bfloat16())
    audio_bf16 = copy.deepcopy(vocoder).to(torch.bfloat16)(mel_bf16)
    assert mel_bf16.dtype == audio_bf16.dtype == torch.bfloat16
    assert audio_bf16.shape == audio.shape
    assert (mel_bf16.float() - mel).abs().max() < 0.05 * mel.abs().max()
    assert (audio_bf16.float() - audio).abs().max() < 0.1 * audio.abs().max()
