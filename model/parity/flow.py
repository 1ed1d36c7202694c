"""Parity runners for the flow network (flow_net) and the guided Euler sampler (flow_sampling)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn

from model.flow import FLOW_CONFIGS, ChannelLastConv1d, Conditions, FlowNetwork
from model.parity.harness import Fixture
from model.sampler import euler_sample


def _sgemm_convolutions(runner: Callable[[Fixture], dict[str, Tensor]]) -> Callable[[Fixture], dict[str, Tensor]]:
    """Run with oneDNN off: its float32 convolutions on AVX2 CPUs round ~10x coarser than MKL's sgemm path
    (measured here: 1e-5 vs 1.5e-6 on unit-scale outputs), which would eat most of the fixtures' tolerance."""

    @functools.wraps(runner)
    def run(fixture: Fixture) -> dict[str, Tensor]:
        enabled = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = False
        try:
            return runner(fixture)
        finally:
            torch.backends.mkldnn.enabled = enabled

    return run


def _network(fixture: Fixture) -> FlowNetwork:
    variant = fixture.config["variant"]
    net = FlowNetwork.from_state_dict(FLOW_CONFIGS[variant], fixture.weights(), source=f"fixture weights ({variant})")
    # Contiguous convolution weights, as the reference holds them: the CPU convolution then sums in the reference's
    # order (our channel-last layout is for cuDNN) and the projected conditions reproduce bit for bit.
    for conv in (m for m in net.modules() if isinstance(m, ChannelLastConv1d)):
        conv.weight = nn.Parameter(conv.weight.contiguous(), requires_grad=False)
    return net


def _features(fixture: Fixture) -> tuple[Tensor, Tensor, Tensor]:
    return fixture.input_tensor("clip_f"), fixture.input_tensor("sync_f"), fixture.input_tensor("text_f")


def _named(prefix: str, conditions: Conditions) -> dict[str, Tensor]:
    return {f"{prefix}.{name}": value for name, value in vars(conditions).items()}


@_sgemm_convolutions
def run_flow_net(fixture: Fixture) -> dict[str, Tensor]:
    net = _network(fixture)
    clip_f, sync_f, text_f = _features(fixture)
    latent = fixture.input_tensor("latent")
    batch, latent_len, _ = latent.shape
    t_a, t_b = fixture.input_tensor("t_a"), fixture.input_tensor("t_b")

    cond = net.preprocess_conditions(clip_f, sync_f, text_f, latent_len)
    out = _named("cond", cond)
    out["flow_t_a"] = net.predict_flow(latent, t_a, cond)
    out["flow_t_b"] = net.predict_flow(latent, t_b, cond)

    variants = {"empty": None}
    if "negative_text_f" in fixture.inputs:
        variants["empty_neg"] = fixture.input_tensor("negative_text_f")
    for prefix, negative_text_f in variants.items():
        empty = net.empty_conditions(batch, latent_len, clip_f.shape[1], sync_f.shape[1], negative_text_f)
        out |= _named(prefix, empty)
        out[f"{prefix}.flow_t_a"] = net.predict_flow(latent, t_a, empty)
    return out


@_sgemm_convolutions
def run_flow_sampling(fixture: Fixture) -> dict[str, Tensor]:
    config = fixture.config
    net = _network(fixture)
    clip_f, sync_f, text_f = _features(fixture)
    x0 = fixture.input_tensor("x0")
    batch, latent_len, latent_dim = x0.shape

    cond = net.preprocess_conditions(clip_f, sync_f, text_f, latent_len)
    negative_text_f = fixture.input_tensor("negative_text_f") if config["negative"] else None
    uncond = net.empty_conditions(batch, latent_len, clip_f.shape[1], sync_f.shape[1], negative_text_f)

    steps: list[tuple[Tensor, Tensor, Tensor]] = []
    x1 = euler_sample(
        lambda t, x: net.guided_flow(t, x, cond, uncond, config["cfg_strength"]),
        x0,
        config["num_steps"],
        on_step=lambda i, t, x, flow: steps.append((t, x, flow)),
    )
    step_t, step_x, step_flow = (torch.stack(column) for column in zip(*steps, strict=True))
    noise_rng = torch.Generator("cpu").manual_seed(config["x0_seed"])
    return {
        "x1": x1,
        "x1_unnormalized": net.unnormalize(x1),
        "step_t": step_t,
        "step_x": step_x,
        "step_flow": step_flow,
        "randn_x0_seed": torch.randn(batch, latent_len, latent_dim, generator=noise_rng),
    }
