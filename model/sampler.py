"""Euler integration of a flow-matching ODE from noise (t = 0) to data (t = 1), as MMAudio samples."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

VelocityFn = Callable[[Tensor, Tensor], Tensor]  # (t: 0-d float32 tensor, x) -> dx/dt
# (step index, t, x at t, velocity at (t, x)); raising stops the sampling (cancellation) and propagates
StepCallback = Callable[[int, Tensor, Tensor, Tensor], None]
# (t, x at t) -> x at t with some frames replaced (model.windows.Pins: inpainting)
Constraint = Callable[[Tensor, Tensor], Tensor]


def euler_sample(
    velocity_fn: VelocityFn,
    x0: Tensor,
    num_steps: int,
    on_step: StepCallback | None = None,
    constrain: Constraint | None = None,
) -> Tensor:
    """x_{k+1} = x_k + (t_{k+1} - t_k) * v(t_k, x_k) on t = linspace(0, 1, num_steps + 1) in float32;
    ``constrain(t_{k+1}, x_{k+1})`` replaces x_{k+1} after each step when given."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    times = torch.linspace(0, 1, num_steps + 1, dtype=torch.float32)
    x = x0
    for i in range(num_steps):
        t = times[i]
        flow = velocity_fn(t, x)
        if on_step is not None:
            on_step(i, t, x, flow)
        x = x + (times[i + 1] - t) * flow
        if constrain is not None:
            x = constrain(times[i + 1], x)
    return x
