"""Making sure the configured variant's official weights are on disk before a worker loads them."""

from __future__ import annotations

from model.weights import downloader as official_weights
from service.settings import Settings


def ensure_weights(settings: Settings) -> None:
    """Download (with progress bars) whatever files the variant still lacks; nothing to do for `tiny`."""
    if settings.weights == "official":
        official_weights.download(settings.variant, settings.weights_dir)
