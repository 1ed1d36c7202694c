"""Reading checkpoint files into our modules, with errors that name every wrong key."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Self

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint that does not fit the module: lists missing, unexpected and mis-shaped keys."""

    def __init__(self, source: str, missing: list[str], unexpected: list[str], mismatched: list[str]) -> None:
        self.source, self.missing, self.unexpected, self.mismatched = source, missing, unexpected, mismatched
        parts = [f"{source} does not match the model"]
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if keys:
                parts.append(f"{len(keys)} {label}: " + ", ".join(keys))
        super().__init__("; ".join(parts))


def read_state_dict(path: str | Path, container: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a .pth/.pt/.bin/.safetensors file; ``container`` picks a sub-dict (BigVGAN's 'generator')."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(path)
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
            sd = torch.load(path, map_location="cpu", weights_only=True)
    if container is not None:
        if not isinstance(sd, dict) or container not in sd:
            raise CheckpointError(str(path), [container], [], [])
        sd = sd[container]
    if not isinstance(sd, dict):
        raise CheckpointError(str(path), ["<a state dict>"], [type(sd).__name__], [])
    return sd


def _without(state_dict: Mapping[str, torch.Tensor], prefixes: Iterable[str]) -> dict[str, torch.Tensor]:
    prefixes = tuple(prefixes)
    return {k: v for k, v in state_dict.items() if not (prefixes and k.startswith(prefixes))}


def check_keys(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str = "checkpoint",
    ignore_prefixes: Iterable[str] = (),
) -> None:
    """Raise CheckpointError unless ``state_dict`` has exactly the module's keys and shapes."""
    expected = module.state_dict()
    given = _without(state_dict, ignore_prefixes)
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    mismatched = sorted(
        f"{k} {list(given[k].shape)} != {list(expected[k].shape)}"
        for k in set(given) & set(expected)
        if given[k].shape != expected[k].shape
    )
    if missing or unexpected or mismatched:
        raise CheckpointError(source, missing, unexpected, mismatched)


def load_checked(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str = "checkpoint",
    ignore_prefixes: Iterable[str] = (),
) -> None:
    """Strictly load ``state_dict`` into ``module`` after check_keys (keys under ignore_prefixes dropped)."""
    kept = _without(state_dict, ignore_prefixes)
    check_keys(module, kept, source)
    module.load_state_dict(kept)


class Loadable:
    """The one way every component is built: whole, from its config and a state dict (no half-loaded modules).

    Subclasses define ``from_state_dict``; ``from_file`` reads an official checkpoint file for it.
    """

    container: ClassVar[str | None] = None  # the sub-dict of the official file holding the state dict

    @classmethod
    def from_state_dict(cls, config: Any, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> Self:
        raise NotImplementedError

    @classmethod
    def from_file(cls, config: Any, path: str | Path) -> Self:
        return cls.from_state_dict(config, read_state_dict(path, cls.container), source=str(path))
