"""Behaviour of the flow network and the Euler sampler on tiny random-weight configurations.

The official numerics are checked by the flow_net / flow_sampling fixtures (tests/test_parity.py);
these tests cover what the fixtures cannot: several requests on one model, batching, guidance
paths, loading errors and bfloat16.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import fields, replace

import pytest
import torch

from model.checkpoint import CheckpointError
from model.flow import FLOW_CONFIGS, Conditions, FlowConfig, FlowNetwork
from model.recipe import manifest_of, synth_state_dict
from model.sampler import euler_sample

TINY_V1 = replace(FLOW_CONFIGS["small_16k"].tiny(clip_dim=32, sync_dim=24, text_dim=40), text_seq_len=6)
TINY_V2 = replace(FLOW_CONFIGS["large_44k_v2"].tiny(clip_dim=32, sync_dim=24, text_dim=40), text_seq_len=6)

# (latent, clip, sync) lengths of three request durations; NEAR_SHORT has SHORT's clip length but a
# different clip RoPE scaling (latent_len / clip_len)
SHORT = (16, 4, 8)
NEAR_SHORT = (18, 4, 8)
LONG = (27, 7, 24)


@pytest.fixture(autouse=True)
def _inference() -> Iterator[None]:
    with torch.inference_mode():
        yield


@functools.cache
def random_state_dict(config: FlowConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        skeleton = FlowNetwork(config)
    return synth_state_dict(manifest_of(skeleton.state_dict()), seed)


def random_network(config: FlowConfig, seed: int = 0) -> FlowNetwork:
    return FlowNetwork.from_state_dict(config, random_state_dict(config, seed))


def random_features(config: FlowConfig, batch: int, lengths: tuple[int, int, int], seed: int = 1):
    _, clip_len, sync_len = lengths
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, clip_len, config.clip_dim, generator=gen),
        torch.randn(batch, sync_len, config.sync_dim, generator=gen),
        torch.randn(batch, config.text_seq_len, config.text_dim, generator=gen),
    )


def random_latent(config: FlowConfig, batch: int, latent_len: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch, latent_len, config.latent_dim, generator=torch.Generator().manual_seed(seed))


def flow_for(net: FlowNetwork, lengths: tuple[int, int, int], t: float = 0.3) -> torch.Tensor:
    cond = net.preprocess_conditions(*random_features(net.config, 1, lengths), lengths[0])
    return net.predict_flow(random_latent(net.config, 1, lengths[0]), torch.tensor([t]), cond)


def assert_same_up_to_rounding(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-4) -> None:
    """Equal but for float32 rounding: batched and single runs (and fused vs separate products) take different
    CPU kernels, whose ~1e-6 differences the random tiny networks amplify to ~1e-5 of the output norm; a real
    bug (mixed samples, wrong branch) differs by O(1)."""
    assert actual.shape == expected.shape
    relative = ((actual - expected).norm() / expected.norm()).item()
    assert relative < tol, relative


def assert_conditions_same(a: Conditions, b: Conditions) -> None:
    for f in fields(Conditions):
        assert_same_up_to_rounding(getattr(a, f.name), getattr(b, f.name))


@pytest.mark.parametrize("config", [TINY_V1, TINY_V2], ids=["v1", "v2"])
def test_request_lengths_leave_no_state_behind(config: FlowConfig) -> None:
    shared = random_network(config)
    requests = [SHORT, LONG, NEAR_SHORT, SHORT]
    fresh = {lengths: flow_for(random_network(config), lengths) for lengths in set(requests)}
    for lengths in requests:
        flow = flow_for(shared, lengths)
        assert flow.shape == (1, lengths[0], config.latent_dim)
        assert torch.equal(flow, fresh[lengths])


def test_sync_features_reach_the_same_latents_in_every_dtype() -> None:
    # 8 s at 44.1 kHz: 192 sync tokens for 345 latents, where float64 nearest-exact would round two differently
    net = random_network(TINY_V2)
    lengths = (345, 4, 192)
    features = random_features(TINY_V2, 1, lengths)
    single = net.preprocess_conditions(*features, lengths[0]).sync_f
    double = net.double().preprocess_conditions(*features, lengths[0]).sync_f
    assert_same_up_to_rounding(single, double, tol=1e-6)
    assert (single - double).abs().max() < 1e-5


def test_batch_matches_single_requests() -> None:
    net = random_network(TINY_V1)
    latent_len, clip_len, sync_len = SHORT
    clip_f, sync_f, text_f = random_features(TINY_V1, 2, SHORT)
    negative_f = random_features(TINY_V1, 2, SHORT, seed=5)[2]
    x = random_latent(TINY_V1, 2, latent_len)
    t = torch.tensor([0.1, 0.7])
    cfg = torch.tensor([4.5, 0.5])  # one guided request, one conditional-only request

    cond = net.preprocess_conditions(clip_f, sync_f, text_f, latent_len)
    uncond = net.empty_conditions(2, latent_len, clip_len, sync_len, negative_f)
    batched = net.guided_flow(t, x, cond, uncond, cfg)

    for i in range(2):
        row = slice(i, i + 1)
        cond_i = net.preprocess_conditions(clip_f[row], sync_f[row], text_f[row], latent_len)
        assert_conditions_same(cond_i, Conditions(*(getattr(cond, f.name)[row] for f in fields(Conditions))))
        uncond_i = net.empty_conditions(1, latent_len, clip_len, sync_len, negative_f[row])
        single = net.guided_flow(t[row], x[row], cond_i, uncond_i, float(cfg[i]))
        assert_same_up_to_rounding(batched[row], single)


def test_guidance_mixes_conditional_and_unconditional_flows() -> None:
    net = random_network(TINY_V2)
    latent_len, clip_len, sync_len = SHORT
    cond = net.preprocess_conditions(*random_features(TINY_V2, 1, SHORT), latent_len)
    uncond = net.empty_conditions(1, latent_len, clip_len, sync_len)
    x, t = random_latent(TINY_V2, 1, latent_len), torch.tensor(0.25)
    v_cond = net.predict_flow(x, t.expand(1), cond)
    v_uncond = net.predict_flow(x, t.expand(1), uncond)

    guided = net.guided_flow(t, x, cond, uncond, 4.5)
    assert_same_up_to_rounding(guided, 4.5 * v_cond - 3.5 * v_uncond)
    assert (guided - v_cond).norm() > 0.1 * v_cond.norm()  # the unconditional branch matters
    assert_same_up_to_rounding(net.guided_flow(t, x, cond, uncond, 1.0), v_cond)


def test_cfg_below_one_uses_only_the_conditional_branch() -> None:
    net = random_network(TINY_V1)
    latent_len = SHORT[0]
    cond = net.preprocess_conditions(*random_features(TINY_V1, 1, SHORT), latent_len)
    # unconditional features for another duration: evaluating them here would fail on the length check
    unusable = net.empty_conditions(1, LONG[0], LONG[1], LONG[2])
    x, t = random_latent(TINY_V1, 1, latent_len), torch.tensor([0.5])
    expected = net.predict_flow(x, t, cond)
    assert torch.equal(net.guided_flow(t, x, cond, unusable, 0.7), expected)
    assert torch.equal(net.guided_flow(t, x, cond, unusable, torch.tensor([0.0])), expected)
    with pytest.raises(RuntimeError):  # cfg > 1 does evaluate them
        net.guided_flow(t, x, cond, unusable, 2.0)


def test_empty_conditions_are_the_single_sample_ones_broadcast() -> None:
    net = random_network(TINY_V1)
    latent_len, clip_len, sync_len = SHORT
    one = net.empty_conditions(1, latent_len, clip_len, sync_len)
    three = net.empty_conditions(3, latent_len, clip_len, sync_len)
    for f in fields(Conditions):
        assert getattr(three, f.name).shape[0] == 3
        assert torch.equal(getattr(three, f.name), getattr(one, f.name).expand_as(getattr(three, f.name)))
    negative_f = random_features(TINY_V1, 3, SHORT, seed=9)[2]
    negative = net.empty_conditions(3, latent_len, clip_len, sync_len, negative_f)
    assert torch.equal(negative.clip_f, three.clip_f)
    assert not torch.allclose(negative.text_f[0], negative.text_f[1])  # per-sample negative prompts


def test_official_checkpoint_loads_and_bad_keys_are_named() -> None:
    sd = random_state_dict(TINY_V1)
    # derived buffers that official checkpoints may carry are ignored
    with_buffers = sd | {"t_embed.freqs": torch.zeros(128), "latent_rot": torch.zeros(1), "clip_rot": torch.zeros(1)}
    net = FlowNetwork.from_state_dict(TINY_V1, with_buffers)
    assert torch.equal(net.state_dict()["empty_string_feat"], sd["empty_string_feat"])

    broken = dict(sd)
    del broken["fused_blocks.1.attn.q_norm.weight"]
    broken["joint_blocks.0.clip_block.extra.weight"] = torch.zeros(3)
    broken["final_layer.conv.weight"] = torch.zeros(5, 5, 7)
    with pytest.raises(CheckpointError) as info:
        FlowNetwork.from_state_dict(TINY_V1, broken, source="broken.pth")
    message = str(info.value)
    for key in ("broken.pth", "fused_blocks.1.attn.q_norm.weight", "joint_blocks.0.clip_block.extra.weight"):
        assert key in message
    assert "final_layer.conv.weight [5, 5, 7]" in message


def test_full_size_configs_match_the_manifests() -> None:
    import json
    from pathlib import Path

    manifests = Path(__file__).parent / "reference" / "manifests"
    for name, config in FLOW_CONFIGS.items():
        with torch.device("meta"):
            net = FlowNetwork(config)
        keys = json.loads((manifests / f"flow_{name}.json").read_text())["keys"]
        assert manifest_of(net.state_dict()) == {k: (shape, dtype) for k, (shape, dtype) in keys.items()}, name


def test_bfloat16_network_tracks_float32() -> None:
    net = random_network(TINY_V2)
    latent_len, clip_len, sync_len = SHORT
    features = random_features(TINY_V2, 2, SHORT)
    x, t = random_latent(TINY_V2, 2, latent_len), torch.tensor([0.2, 0.8])

    def guided(network: FlowNetwork) -> torch.Tensor:
        cond = network.preprocess_conditions(*features, latent_len)
        uncond = network.empty_conditions(2, latent_len, clip_len, sync_len)
        return network.guided_flow(t, x, cond, uncond, 4.5)

    reference = guided(net)
    low = guided(net.to(torch.bfloat16))
    assert low.dtype == torch.float32  # the ODE state keeps its dtype
    assert torch.isfinite(low).all()
    relative = (low - reference).norm() / reference.norm()
    assert relative < 0.05, relative


def test_normalize_round_trip_does_not_touch_its_argument() -> None:
    net = random_network(TINY_V1)
    x = random_latent(TINY_V1, 2, 5)
    before = x.clone()
    torch.testing.assert_close(net.normalize(net.unnormalize(x)), x)
    torch.testing.assert_close(net.unnormalize(x), x * net.latent_std + net.latent_mean)
    assert torch.equal(x, before)


def test_euler_integrates_on_a_uniform_grid() -> None:
    x0 = torch.zeros(3)
    calls: list[tuple[int, float]] = []
    # dx/dt = t: Euler sums t_k * dt over the left ends of the grid
    x1 = euler_sample(lambda t, x: t.expand_as(x), x0, 4, on_step=lambda i, t, x, flow: calls.append((i, t.item())))
    assert calls == [(0, 0.0), (1, 0.25), (2, 0.5), (3, 0.75)]
    torch.testing.assert_close(x1, torch.full((3,), 0.25 * (0 + 0.25 + 0.5 + 0.75)))
    # a linear flow x1 - x0 is integrated exactly: the rectified-flow straight path
    target = torch.tensor([1.0, -2.0, 3.0])
    start = torch.tensor([0.5, 0.5, 0.5])
    torch.testing.assert_close(euler_sample(lambda t, x: target - start, start, 7), target)


def test_euler_stops_when_the_step_callback_raises() -> None:
    class Cancelled(Exception):
        pass

    evaluations = []

    def velocity(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        evaluations.append(t.item())
        return torch.ones_like(x)

    def cancel_at_second_step(i: int, t: torch.Tensor, x: torch.Tensor, flow: torch.Tensor) -> None:
        if i == 1:
            raise Cancelled

    with pytest.raises(Cancelled):
        euler_sample(velocity, torch.zeros(2), 10, on_step=cancel_at_second_step)
    assert evaluations == pytest.approx([0.0, 0.1])
