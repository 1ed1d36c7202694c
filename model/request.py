"""What one generation is asked to do: the one table of its parameters (defaults and help texts), which the
CLI's options, the service's job parameters and the worker's requests are all made from. Kept free of torch
so that the API can read it cheaply."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


def parameter(default: Any, help_text: str, flag: str | None = None) -> Any:
    """A generation parameter: its default and the help text the CLI shows (``flag``: its option, when not
    the field's name)."""
    return field(default=default, metadata={"help": help_text, "flag": flag})


@dataclass
class GenerationRequest:
    """The parameters of one generation (the one table of them: the CLI's options are made from it, the
    service maps its job parameters onto it by name) and its input, a video, an image or none."""

    prompt: str = parameter("", "what the audio should contain")
    # None: the checkpoint's learned empty-prompt features (no negative prompt)
    negative_prompt: str | None = parameter("", "what the audio should not contain")
    # None: the whole video (video requests only)
    duration: float | None = parameter(
        8.0, "seconds, or 'video' for the whole video (a shorter video shortens it; past 8 s: overlapping windows)"
    )
    num_steps: int = parameter(25, "Euler steps", flag="--steps")
    cfg_strength: float = parameter(4.5, "classifier-free guidance")
    seed: int = parameter(42, "random seed")
    mask_away_clip: bool = parameter(False, "ignore the video's CLIP (semantic) features (keep its sync features)")
    # noise = randn(num_samples, ...) from one generator seeded with `seed`
    num_samples: int = parameter(1, "samples generated together")
    video: Path | None = None
    image: Path | None = None


REQUEST_PARAMETERS = tuple(item for item in fields(GenerationRequest) if "help" in item.metadata)
