"""CLIP conditioning features: one embedding per 8 fps video frame and one per text token.

MMAudio uses Apple's DFN5B CLIP (ViT-H/14 at 378 px, QuickGELU) through open_clip.  Images use the
usual CLIP path (class-token embedding, projection, L2 norm).  Text does NOT: MMAudio keeps the final
hidden state of all 77 positions (after ln_final, L2-normalised per token) instead of the pooled,
projected end-of-text embedding, so the text path is written here over open_clip's modules.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from model.checkpoint import Loadable, check_keys

# open_clip's model config of DFN5B-CLIP-ViT-H-14-384 (= its built-in 'ViT-H-14-378-quickgelu').
DFN5B_MODEL_CFG: dict[str, Any] = {
    "embed_dim": 1024,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 378, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}
# Small widths, same patching, image size, context and vocabulary (so the real tokenizer fits): for tests.
TINY_MODEL_CFG: dict[str, Any] = {
    "embed_dim": 64,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 378, "layers": 2, "width": 64, "head_width": 32, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@dataclass(frozen=True)
class ClipConfig:
    model_cfg: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(DFN5B_MODEL_CFG))
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    # MMAudio resizes frames to 384 px; the 378 px ViT's stride-14 patches simply never reach the last 6.
    frame_size: int = 384
    tokenizer: str = "ViT-H-14-378-quickgelu"

    @property
    def context_length(self) -> int:
        return self.model_cfg["text_cfg"]["context_length"]

    @classmethod
    def tiny(cls) -> ClipConfig:
        return cls(model_cfg=copy.deepcopy(TINY_MODEL_CFG))

    @classmethod
    def from_open_clip(cls, open_clip_config: Mapping[str, Any], tokenizer: str | None = None) -> ClipConfig:
        """From an ``open_clip_config.json`` dict (``model_cfg`` plus ``preprocess_cfg`` mean / std)."""
        preprocess = open_clip_config.get("preprocess_cfg", {})
        defaults = cls()
        return cls(
            model_cfg=copy.deepcopy(dict(open_clip_config["model_cfg"])),
            mean=tuple(preprocess.get("mean", defaults.mean)),
            std=tuple(preprocess.get("std", defaults.std)),
            tokenizer=tokenizer or defaults.tokenizer,
        )


def causal_mask(length: int) -> torch.Tensor:
    """Additive attention mask: position i sees positions <= i."""
    return torch.full((length, length), float("-inf")).triu(1)


class ClipEncoder(Loadable, nn.Module):
    def __init__(self, clip: open_clip.CLIP, config: ClipConfig) -> None:
        super().__init__()
        self.config = config
        self.clip = clip
        self.tokenizer = open_clip.get_tokenizer(config.tokenizer, context_length=config.context_length)

    @classmethod
    def from_state_dict(
        cls, config: ClipConfig, state_dict: Mapping[str, torch.Tensor], source: str = "CLIP checkpoint"
    ) -> ClipEncoder:
        """Build the open_clip model and load ``state_dict`` strictly (its keys are open_clip's, as in the hub's
        ``open_clip_pytorch_model.bin``)."""
        # Built on the meta device and filled by assignment: random init of ~1B values would take longer
        # than loading, and would double peak memory.
        with torch.device("meta"):
            clip = open_clip.CLIP(**config.model_cfg)
        check_keys(clip, state_dict, source)
        clip.load_state_dict(state_dict, strict=True, assign=True)
        # the causal mask is a non-persistent buffer: not in the file, so make it for real
        clip.attn_mask = causal_mask(config.context_length)
        return cls(clip, config).eval()

    @property
    def _weight(self) -> torch.Tensor:
        return self.clip.visual.conv1.weight

    @torch.inference_mode()
    def encode_images(self, images: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """(B, T, 3, 384, 384) in [0, 1] -> L2-normalised image embeddings (B, T, embed_dim).

        ``chunk_size`` images go through the vision tower at a time (default: all at once).
        """
        size = self.config.frame_size
        if images.shape[-3:] != (3, size, size):
            raise ValueError(f"CLIP wants frames of shape (3, {size}, {size}), got {tuple(images.shape)}")
        b, t = images.shape[:2]
        x = images.to(self._weight.device, torch.float32).flatten(0, 1)
        mean = torch.tensor(self.config.mean, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.config.std, device=x.device).view(3, 1, 1)
        x = ((x - mean) / std).to(self._weight.dtype)
        chunk = chunk_size or x.shape[0]
        features = torch.cat([self.clip.encode_image(part, normalize=True) for part in x.split(chunk)])
        return features.unflatten(0, (b, t))

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """(N, 77) int64: [SOT] BPE [EOT] zero padded; longer prompts are cut with [EOT] kept last."""
        return self.tokenizer(list(prompts))

    @torch.inference_mode()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, 77) token ids -> (N, 77, width): final hidden state of every position, L2-normalised."""
        clip = self.clip
        x = clip.token_embedding(tokens.to(self._weight.device)) + clip.positional_embedding
        x = clip.transformer(x, attn_mask=clip.attn_mask)
        return F.normalize(clip.ln_final(x), dim=-1)

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.encode_text(self.tokenize(prompts))

