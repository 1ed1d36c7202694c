"""The browser page at `/` (static files shipped in the package) and `/v1/info`, what it reads first."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from service.api.state import app_state
from service.schemas import ResultFormat, ServiceInfo, ServiceLimits, WeightsInfo

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

router = APIRouter()


@router.get("/", include_in_schema=False)
def page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/v1/info", response_model=ServiceInfo, tags=["service"], summary="What this deployment serves")
def info(request: Request) -> ServiceInfo:
    """Variants, weights, output formats and limits, and whether API keys are required. Needs no API key
    (it tells a client that it needs one), and holds nothing about any job or key."""
    state = app_state(request)
    settings = state.settings
    return ServiceInfo(
        api_keys_required=state.keyring.enabled,
        default_variant=settings.variant,
        variants=settings.enabled_variants,
        weights=WeightsInfo(kind=settings.weights, random_weights=settings.weights == "tiny"),
        formats=list(get_args(ResultFormat)),
        limits=ServiceLimits(
            max_duration=settings.max_duration,
            max_num_steps=settings.max_num_steps,
            max_num_samples=settings.max_num_samples,
            max_prompt_chars=settings.max_prompt_chars,
            max_upload_bytes=settings.max_upload_bytes,
        ),
    )
