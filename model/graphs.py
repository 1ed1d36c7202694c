"""CUDA graphs for sampling: one guided Euler step captured per batch shape, replayed for every step.

A step of the large flow network is ~1000 small kernels; launched one by one from Python the GPU idles
most of the time.  Replaying a captured graph launches them all at once.  The graph reads its inputs
from static tensors (latents, time, step size, guidance weights, conditions) that are refilled before
each replay, so one capture serves every request of that shape (batch rows, latent/clip/sync lengths),
and a step boundary is still where progress is reported and cancellation is honoured.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from model.flow import Conditions, FlowNetwork
from model.sampler import Constraint, StepCallback

WARMUP_STEPS = 3  # eager runs before capture: they build the size-keyed tables and settle the allocator


@dataclass
class StepGraph:
    graph: torch.cuda.CUDAGraph
    x: Tensor  # (B, L, D) latents, updated in place by every replay
    t: Tensor  # () float32
    dt: Tensor  # () float32
    weight: Tensor  # (B, 1, 1) float32 guidance weights
    conditions: Conditions  # conditional rows, then (when guided) unconditional rows
    flow: Tensor  # (B, L, D) the guided velocity of the last replay


def _guided_step(net: FlowNetwork, s: StepGraph, guided: bool) -> None:
    batch = s.x.shape[0]
    if guided:
        v_cond, v_uncond = net.predict_flow(torch.cat([s.x, s.x]), s.t.expand(2 * batch), s.conditions).chunk(2)
        flow = (s.weight * v_cond + (1 - s.weight) * v_uncond).to(s.x.dtype)  # the eager guided_flow's mix
    else:
        flow = net.predict_flow(s.x, s.t.expand(batch), s.conditions).to(s.x.dtype)
    s.flow.copy_(flow)
    s.x.copy_(s.x + s.dt * flow)


class GraphedEulerSampler:
    """Euler sampling like model.sampler.euler_sample, with each step a CUDA graph replay."""

    def __init__(self, net: FlowNetwork, max_graphs: int = 8) -> None:
        self.net = net
        self.max_graphs = max_graphs  # each graph keeps a private memory pool: bound how many stay alive
        self._graphs: OrderedDict[tuple, StepGraph] = OrderedDict()

    def _capture(self, x0: Tensor, conditions: Conditions, guided: bool) -> StepGraph:
        device = x0.device
        static = StepGraph(
            graph=torch.cuda.CUDAGraph(),
            x=x0.clone(),
            t=torch.zeros((), dtype=torch.float32, device=device),
            dt=torch.zeros((), dtype=torch.float32, device=device),
            weight=torch.ones(x0.shape[0], 1, 1, dtype=torch.float32, device=device),
            conditions=Conditions(*(getattr(conditions, f.name).contiguous().clone() for f in fields(conditions))),
            flow=torch.zeros_like(x0),
        )
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                _guided_step(self.net, static, guided)
        torch.cuda.current_stream(device).wait_stream(side)
        with torch.cuda.graph(static.graph):
            _guided_step(self.net, static, guided)
        return static

    def sample(
        self,
        x0: Tensor,
        cond: Conditions,
        uncond: Conditions,
        cfg_strength: Tensor,
        num_steps: int,
        on_step: StepCallback | None = None,
        constrain: Constraint | None = None,
    ) -> Tensor:
        """Same arguments and result as the eager guided sampler; ``on_step`` sees each step's updated latents.
        ``constrain`` runs eagerly between replays, on the static latents the next replay reads."""
        batch = x0.shape[0]
        cfg = cfg_strength.float().expand(batch)
        guided = bool((cfg >= 1).any())
        conditions = cond.cat(uncond) if guided else cond
        key = (
            tuple(x0.shape),
            x0.dtype,
            x0.device,
            guided,
            *(tuple(getattr(conditions, f.name).shape) for f in fields(conditions)),
        )
        static = self._graphs.pop(key, None) or self._capture(x0, conditions, guided)
        self._graphs[key] = static
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)

        for f in fields(conditions):
            getattr(static.conditions, f.name).copy_(getattr(conditions, f.name))
        static.weight.copy_(torch.where(cfg < 1, 1.0, cfg).view(batch, 1, 1))
        static.x.copy_(x0)
        times = torch.linspace(0, 1, num_steps + 1, dtype=torch.float32).to(x0.device)
        for i in range(num_steps):
            static.t.copy_(times[i])
            static.dt.copy_(times[i + 1] - times[i])
            static.graph.replay()
            if constrain is not None:
                static.x.copy_(constrain(times[i + 1], static.x))
            if on_step is not None:
                on_step(i, times[i], static.x, static.flow)
        return static.x.clone()
