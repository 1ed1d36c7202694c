"""Deterministic random weights: the same (manifest, seed) always gives the same state dict.

Used for the parity fixtures (the official outputs were produced with exactly these weights) and
for the ``tiny`` preset.  Each tensor draws from its own generator, seeded from the key name, so
the result does not depend on the order in which keys are listed or modules are built.  Normals
are made with the inverse normal CDF from float64 uniforms because torch's float32 ``randn``
kernel gives different bits on different CPU instruction sets.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence

import torch

# Buffers that are model constants (VAE mel statistics, BigVGAN low-pass taps): never generated.
CONSTANT_KEY = re.compile(r"(^|\.)(data_mean|data_std)$|\.filter$")

Shape = Sequence[int]
Manifest = Mapping[str, tuple[Shape, str]]


def key_seed(seed: int, key: str) -> int:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def standard_normal(shape: Shape, generator_seed: int) -> torch.Tensor:
    """float64 N(0, 1) of ``shape`` via ndtri of uniforms (bit-stable across CPUs)."""
    gen = torch.Generator(device="cpu").manual_seed(generator_seed)
    u = torch.rand(math.prod(shape), generator=gen, dtype=torch.float64).clamp_(min=2.0**-53)
    return torch.special.ndtri(u, out=u).view(tuple(shape))


def _weight_norm_gain(key: str) -> float:
    # keeps BigVGAN activations away from both explosion and a saturated tanh / clamp
    if re.search(r"(^|\.)resblocks\.", key):
        return 0.25
    if re.search(r"(^|\.)conv_post\.", key):
        return 0.15
    return 1.0


def init_value(key: str, shape: Shape, z: torch.Tensor, snake_logscale: bool = True) -> torch.Tensor | None:
    """Scale the float64 normal ``z`` by the rule for ``key``; None for model constants."""
    if CONSTANT_KEY.search(key):
        return None
    shape = list(shape)
    fan_in = math.prod(shape[1:]) if len(shape) >= 2 else max(math.prod(shape), 1)
    if re.search(r"(\.weight_g|\.parametrizations\.weight\.original0)$", key):
        return (1.0 + 0.05 * z) * _weight_norm_gain(key)
    if re.search(r"(\.weight_v|\.parametrizations\.weight\.original1)$", key):
        return z / math.sqrt(fan_in)
    if re.search(r"(^|\.)(clip|text)_input_proj\.0\.weight$", key) or re.search(r"(^|\.)empty_sync_feat$", key):
        return z  # these consume unit-norm CLIP features / stand in for raw Synchformer features
    if re.search(r"(^|\.)latent_std$", key):
        return torch.exp(0.2 * z)
    if re.search(r"(^|\.)latent_mean$", key):
        return 0.2 * z
    if re.search(r"\.(alpha|beta)$", key):
        return 0.1 * z if snake_logscale else 1.0 + 0.1 * z
    if key.endswith("bias"):
        return 0.02 * z
    if len(shape) == 0:
        return 0.1 * z
    if key.endswith("weight"):
        return 1.0 + 0.1 * z if len(shape) == 1 else z / math.sqrt(fan_in)
    return z / math.sqrt(shape[-1])


_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def synth_state_dict(manifest: Manifest, seed: int, snake_logscale: bool = True) -> dict[str, torch.Tensor]:
    """State dict for ``manifest`` (key -> (shape, dtype name)); constant keys are left out."""
    out: dict[str, torch.Tensor] = {}
    for key, (shape, dtype) in manifest.items():
        shape = [int(s) for s in shape]
        value = init_value(key, shape, standard_normal(shape, key_seed(seed, key)), snake_logscale)
        if value is not None:
            out[key] = value.to(_DTYPES[str(dtype).removeprefix("torch.")])
    return out


def manifest_of(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[list[int], str]]:
    """The manifest (key -> (shape, dtype name)) describing ``state_dict``."""
    return {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state_dict.items()}


def synth_module_state_dict(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Recipe weights for every key of ``module``; the model constants (filters, mel statistics) kept as built."""
    own = module.state_dict()
    weights = synth_state_dict(manifest_of(own), seed)
    return {key: weights.get(key, value) for key, value in own.items()}


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Identity of a state dict, byte for byte as the shared reference README specifies it: per key in sorted
    order, the key, ``str(dtype)``, ``str(list(shape))`` of the flattened tensor and its raw little-endian bytes."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key]
        flat = t.detach().cpu().contiguous().reshape(-1)
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(list(flat.shape)).encode())
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
