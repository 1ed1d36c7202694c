"""Parity runner for end-to-end generation (the official eval_utils.generate, as demo.py calls it)."""

from __future__ import annotations

from typing import Any

import torch

from model.build import Architecture, pipeline_from_state_dicts
from model.parity.harness import Fixture
from model.request import GenerationRequest

# pipeline fixture component name prefix -> our state-dict slot
COMPONENT_SLOTS = {"flow_": "flow", "clip": "clip", "synchformer": "synchformer", "vae_": "vae", "bigvgan": "vocoder"}


def _slot(component: str) -> str:
    return next(slot for prefix, slot in COMPONENT_SLOTS.items() if component.startswith(prefix))


def run_pipeline(fixture: Fixture) -> dict[str, Any]:
    config, inputs = fixture.config, fixture.inputs
    state_dicts = {_slot(name): fixture.weights(name) for name in fixture.data["weights"]["components"]}
    architecture = Architecture.official(config["variant"])
    pipe = pipeline_from_state_dicts(architecture, state_dicts, {"kind": "parity", "random_weights": True, "id": ""})

    def media(key: str):
        return fixture.file(inputs[key]) if inputs.get(key) else None

    request = GenerationRequest(
        prompt=inputs.get("prompt") or "",
        negative_prompt=inputs.get("negative_prompt"),
        duration=float(inputs["duration_sec"]),
        num_steps=int(config["num_steps"]),
        cfg_strength=float(config["cfg_strength"]),
        seed=int(inputs["rng_seed"]),
        mask_away_clip=bool(config.get("mask_away_clip", False)),
        num_samples=int(config.get("batch_size", 1)),  # official batch = the same inputs B times, one generator
        video=media("video_file"),
        image=media("image_file"),
    )
    prepared = pipe.prepare(request)
    features = pipe.encode([prepared])
    x0 = pipe.initial_noise([prepared])
    steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    x1 = pipe.sample(
        features,
        x0,
        request.num_steps,
        request.cfg_strength,
        on_step=lambda i, t, x, v: steps.append((t.clone(), x.clone(), v.clone())),
    )
    mel, audio = pipe.decode(x1)

    lengths = prepared.lengths
    out: dict[str, Any] = {
        "duration_sec": torch.tensor(prepared.duration, dtype=torch.float32),
        "seq_lengths": torch.tensor([lengths.latent, lengths.clip, lengths.sync]),
        "clip_features": features.clip,
        "sync_features": features.sync,
        "text_features": features.text,
        "negative_text_features": features.negative_text,
        "x0": x0,
        "step_t": torch.stack([t for t, _, _ in steps]),
        "step_x": torch.stack([x for _, x, _ in steps]),
        "step_flow": torch.stack([v for _, _, v in steps]),
        "x1": x1,
        "x1_unnormalized": pipe.flow.unnormalize(x1),
        "mel": mel,
        "audio": audio,
    }
    if prepared.frames is not None:
        out["clip_frames"] = prepared.frames.clip_frames[None]
        out["sync_frames"] = prepared.frames.sync_frames[None]
    return out
