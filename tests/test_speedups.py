"""The GPU speed-ups of issue 13, checked on the CPU: each new form against the one it replaces, compiled
modules against eager ones, and the float16 overflow guard.  The official numbers themselves are the parity
fixtures' job (tests/test_parity.py): these forms run there too."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model.build import tiny_pipeline
from model.flow import SwiGLU, apply_rope, rope_table
from model.pipeline import Pipeline
from model.request import GenerationRequest
from model.vocoder import AntiAliasedSnakeBeta, sliced_anti_aliased_snake

VARIANT = "small_16k"


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def request(**overrides: object) -> GenerationRequest:
    return replace(GenerationRequest(prompt="waves", duration=1.0, num_steps=2, seed=3), **overrides)


# ---------------------------------------------------------------------------------------------
# real-valued RoPE, merged SwiGLU projections, sliced activation


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_rope_is_the_complex_rotation(dtype: torch.dtype) -> None:
    length, head_dim, scaling = 37, 64, 0.6
    x = torch.randn(2, 3, length, head_dim).to(dtype)
    # the definition: pairs (x0, x1) as x0 + i x1 times exp(i pos * scaling / theta^(2k / head_dim)), in float32
    angles = torch.arange(length)[:, None] * scaling / 10000.0 ** (torch.arange(0, head_dim, 2) / head_dim)
    rotation = torch.polar(torch.ones_like(angles), angles.float())
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    expected = torch.view_as_real(pairs * rotation).flatten(-2)
    actual = apply_rope(x, rope_table(length, scaling, head_dim, 10000.0, x.device))
    assert actual.dtype == dtype
    assert torch.allclose(
        actual.float(), expected.to(dtype).float(), rtol=1e-5, atol=1e-5 if dtype == torch.float32 else 1e-2
    )


@pytest.mark.parametrize("kernel_size", [None, 3])
def test_swiglu_loads_the_official_w1_w3_into_one_projection(kernel_size: int | None) -> None:
    dim = 32
    module = SwiGLU(dim, 4 * dim, kernel_size)
    hidden = module.hidden
    shape = (hidden, dim) if kernel_size is None else (hidden, dim, kernel_size)
    official = {
        "w1.weight": torch.randn(shape),
        "w2.weight": torch.randn((dim, hidden) if kernel_size is None else (dim, hidden, kernel_size)),
        "w3.weight": torch.randn(shape),
    }
    assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == {
        k: tuple(v.shape) for k, v in official.items()
    }
    module.load_state_dict(official, strict=True)
    saved = module.state_dict()
    assert all(torch.equal(saved[k], official[k]) for k in official)

    x = torch.randn(2, 11, dim)
    if kernel_size is None:
        expected = F.linear(
            F.silu(F.linear(x, official["w1.weight"])) * F.linear(x, official["w3.weight"]), official["w2.weight"]
        )
    else:

        def conv(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return F.conv1d(h.transpose(1, 2), w, padding=kernel_size // 2).transpose(1, 2)

        expected = conv(F.silu(conv(x, official["w1.weight"])) * conv(x, official["w3.weight"]), official["w2.weight"])
    assert relative(module(x), expected) < 1e-6


def _random_activation(channels: int, seed: int) -> AntiAliasedSnakeBeta:
    generator = torch.Generator().manual_seed(seed)
    module = AntiAliasedSnakeBeta(channels)
    with torch.no_grad():
        module.act.alpha.copy_(torch.randn(channels, generator=generator) * 0.5)
        module.act.beta.copy_(torch.randn(channels, generator=generator) * 0.5)
    module.act.derive_constants()
    return module


@pytest.mark.parametrize("length", [1, 2, 6, 7, 300])
def test_sliced_activation_is_the_convolution_form(length: int) -> None:
    module = _random_activation(5, seed=length)
    x = torch.randn(3, 5, length) * 2
    expected = module(x.clone())
    actual = sliced_anti_aliased_snake(x, *module.phase_filters(), module.act.frequency, module.act.inverse_magnitude)
    assert actual.shape == expected.shape
    assert torch.allclose(actual, expected, rtol=1e-5, atol=1e-5), (actual - expected).abs().max()


def test_vocoder_with_sliced_activations_matches() -> None:
    vocoder = tiny_pipeline(VARIANT).vocoder
    mel = torch.randn(2, vocoder.config.n_mels, 9)
    expected = vocoder(mel)
    activations = [m for m in vocoder.modules() if isinstance(m, AntiAliasedSnakeBeta)]
    try:
        for m in activations:
            m.sliced = sliced_anti_aliased_snake
        actual = vocoder(mel)
    finally:
        for m in activations:
            m.sliced = None
    assert relative(actual, expected) < 1e-5


# ---------------------------------------------------------------------------------------------
# torch.compile against eager (inductor on the CPU needs a C compiler; the first compilation is slow there)


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return tiny_pipeline(VARIANT)


def eager_then_compiled(module: nn.Module, run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``run()`` before and after ``module.compile()``; the module is eager again afterwards."""
    with torch.inference_mode():
        eager = run()
        module.compile()
        try:
            compiled = run()
            assert module._compiled_call_impl is not None
        finally:
            module._compiled_call_impl = None
    return eager, compiled


@pytest.mark.slow
def test_compiled_flow_step_matches_eager(pipe: Pipeline) -> None:
    flow, generator = pipe.flow, torch.Generator().manual_seed(0)
    config, (latent_len, clip_len, sync_len) = flow.config, (20, 8, 16)
    features = [
        torch.randn(2, n, d, generator=generator)
        for n, d in ((clip_len, config.clip_dim), (sync_len, config.sync_dim), (77, config.text_dim))
    ]
    cond = flow.preprocess_conditions(*features, latent_len)
    uncond = flow.empty_conditions(2, latent_len, clip_len, sync_len)
    x = torch.randn(2, latent_len, config.latent_dim, generator=generator)
    eager, compiled = eager_then_compiled(flow, lambda: flow.guided_flow(torch.tensor(0.3), x, cond, uncond, 4.5))
    assert relative(compiled, eager) < 1e-5


@pytest.mark.slow
def test_compiled_clip_tower_matches_eager(pipe: Pipeline) -> None:
    size = pipe.clip.config.frame_size
    images = torch.rand(1, 2, 3, size, size, generator=torch.Generator().manual_seed(1))
    eager, compiled = eager_then_compiled(pipe.clip.clip.visual, lambda: pipe.clip.encode_images(images))
    assert relative(compiled, eager) < 1e-5


@pytest.mark.slow
def test_compiled_synchformer_matches_eager(pipe: Pipeline) -> None:
    size, frames = pipe.synchformer.config.image_size, pipe.synchformer.config.segment_frames
    video = torch.rand(1, frames, 3, size, size, generator=torch.Generator().manual_seed(2)) * 2 - 1
    eager, compiled = eager_then_compiled(pipe.synchformer, lambda: pipe.synchformer.encode_video(video))
    assert relative(compiled, eager) < 1e-5


@pytest.mark.slow
def test_compiled_vocoder_activations_match_eager(pipe: Pipeline) -> None:
    vocoder = pipe.vocoder
    mel = torch.randn(1, vocoder.config.n_mels, 6, generator=torch.Generator().manual_seed(3))
    activations = [m for m in vocoder.modules() if isinstance(m, AntiAliasedSnakeBeta)]
    with torch.inference_mode():
        eager = vocoder(mel)
        vocoder.compile_activations()
        try:
            compiled = vocoder(mel)
            assert all(m.sliced is not None for m in activations)
        finally:
            for m in activations:
                m.sliced = None
    assert relative(compiled, eager) < 1e-5


# ---------------------------------------------------------------------------------------------
# float16 with a bfloat16 rerun on overflow


def test_float16_overflow_reruns_the_batch_in_bfloat16() -> None:
    # float32 decoders: float16 convolutions are emulated (slow) on CPUs; the overflow is the flow's
    pipe = tiny_pipeline(VARIANT, dtype=torch.float16, decoder_dtype=torch.float32)
    finite = pipe.generate_batch([request()])[0]
    assert "dtype_fallback" not in finite.metadata and finite.metadata["dtype"] == "float16"
    assert torch.isfinite(finite.audio).all()

    # a final layer scaled past float16's range (65504) makes the velocity, then the latents, infinite
    with torch.no_grad():
        pipe.flow.final_layer.conv.weight.mul_(2.0**12)
    conv_weight = pipe.flow.final_layer.conv.weight
    stages: list[str] = []
    results = pipe.generate_batch([request(), request(seed=4)], lambda stage, f, d: stages.append(stage))
    assert stages.count("features") == 4  # the batch ran twice
    for result in results:
        assert result.metadata["dtype_fallback"] == "bfloat16" and result.metadata["dtype"] == "bfloat16"
        assert torch.isfinite(result.audio).all()
    # the float16 weights are back as they were
    assert pipe.dtype == torch.float16 and pipe.flow.final_layer.conv.weight is conv_weight
    assert conv_weight.dtype == torch.float16 and pipe.vocoder.conv_post.weight.dtype == torch.float32


def test_compile_option_compiles_each_module_lazily() -> None:
    pipe = tiny_pipeline(VARIANT, compile_modules=True)
    for module in (pipe.flow, pipe.clip.clip.visual, pipe.synchformer):
        assert module._compiled_call_impl is not None  # compiled on its first call, not here
    assert all(m.sliced is not None for m in pipe.vocoder.modules() if isinstance(m, AntiAliasedSnakeBeta))
    assert tiny_pipeline(VARIANT).flow._compiled_call_impl is None
