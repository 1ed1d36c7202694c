"""Parity runners for the VAE mel decoder and the BigVGAN vocoders."""

from __future__ import annotations

import torch

from model.parity.harness import Fixture
from model.vae import VAE_CONFIGS, VAEDecoder
from model.vocoder import VOCODER_CONFIGS, BigVGAN, VocoderConfig


def _check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != expected:
        raise ValueError(f"fixture input {name} has shape {tuple(tensor.shape)}, its config says {expected}")


def run_vae_decode(fixture: Fixture) -> dict[str, torch.Tensor]:
    cfg = fixture.config
    config = VAE_CONFIGS[cfg["mode"]]
    latent = fixture.input_tensor("latent")
    _check_shape("latent", latent, (cfg["batch_size"], cfg["latent_len"], config.latent_dim))

    vae = VAEDecoder.from_state_dict(config, fixture.weights(), source=fixture.path.name)
    return {
        "mel": vae.decode(latent),
        "wn_removed.decoder.conv_in.weight[:4]": vae.decoder.conv_in.weight[:4],
    }


def run_vocoder(fixture: Fixture) -> dict[str, torch.Tensor]:
    cfg = fixture.config
    config = VOCODER_CONFIGS[cfg["mode"]]
    if "bigvgan_config" in cfg:  # the official config.json the reference was built from
        config = VocoderConfig.from_bigvgan_json(cfg["bigvgan_config"])
    if (config.n_mels, config.hop, config.sampling_rate) != (cfg["n_mels"], cfg["hop"], cfg["sampling_rate"]):
        raise ValueError(f"vocoder config {config} does not fit fixture config {cfg}")
    mel = fixture.input_tensor("mel")
    _check_shape("mel", mel, (cfg["batch_size"], config.n_mels, cfg["mel_len"]))

    vocoder = BigVGAN.from_state_dict(config, fixture.weights(), source=fixture.path.name)
    return {"waveform": vocoder(mel)}
