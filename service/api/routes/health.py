"""Liveness, readiness and Prometheus metrics (no API key needed)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

from service import heartbeats
from service.api.state import app_state
from service.problems import ProblemError

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness: the API process answers")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: Redis answers and a worker has run past its warm-up")
def readyz(request: Request) -> JSONResponse:
    state = app_state(request)
    try:
        state.redis.ping()
        live = heartbeats.live_workers(state.redis)
    except RedisError as err:
        raise ProblemError("service-unavailable", f"Redis is unreachable: {err}") from err
    ready = [info for info in live if info["ready"]]
    if not ready:
        # a worker is ready once it has run MMAUDIO_WORKER_STABLE_SECONDS with its model loaded (its heartbeat)
        detail = f"{len(live)} worker(s) alive, none loaded and stable yet" if live else "no live worker"
        raise ProblemError("service-unavailable", detail, {"Retry-After": "5"}, workers=len(live))
    variants = sorted({info["variant"] for info in ready})
    return JSONResponse({"status": "ready", "workers": len(ready), "variants": variants})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST)
