"""The FastAPI application; `python -m service.api` serves it."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from service.api.auth import KeyRing
from service.api.probing import ProbePool
from service.api.routes import health, jobs, page
from service.api.state import AppState
from service.api.submission import Submitter
from service.connection import connect, connect_async
from service.jobs import JobStore
from service.metrics import RedisCollector
from service.problems import MEDIA_TYPE, PROBLEMS, ProblemError, problem_body, problems_table
from service.results import Results
from service.settings import Settings, get_settings
from service.storage import make_store
from service.upkeep.maintenance import Maintenance, MaintenanceThread
from service.upkeep.webhooks import WebhookSender

log = logging.getLogger(__name__)

HTTP_PROBLEMS = {404: "not-found", 405: "method-not-allowed", 401: "unauthorized"}
API_DESCRIPTION = f"""A browser page for people is at `/`; `python -m service.client` is the command-line client.

With API keys configured, every `/v1` call but `/v1/info` needs `Authorization: Bearer <key>`.

## Problem types

Every error, and the `error` of a failed job, is RFC 9457 `application/problem+json` with one of these `type`s:

{problems_table()}
"""


def problem_response(
    request: Request, slug: str, detail: str | None = None, headers=None, **extensions
) -> JSONResponse:
    body = problem_body(slug, detail, request.url.path, **extensions)
    return JSONResponse(body, status_code=PROBLEMS[slug].status, headers=headers, media_type=MEDIA_TYPE)


def install_error_handlers(app: FastAPI, settings: Settings) -> None:
    async def on_redis_down(request: Request, err: Exception) -> JSONResponse:
        log.warning("Redis unreachable on %s %s: %s", request.method, request.url.path, err)
        retry = {"Retry-After": str(settings.unavailable_retry_seconds)}
        return problem_response(request, "service-unavailable", "The job store (Redis) is unreachable.", retry)

    for unreachable in (RedisConnectionError, RedisTimeoutError):
        app.add_exception_handler(unreachable, on_redis_down)

    @app.exception_handler(ProblemError)
    async def on_problem(request: Request, err: ProblemError) -> JSONResponse:
        return problem_response(request, err.problem.slug, err.detail, err.headers, **err.extensions)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, err: RequestValidationError) -> JSONResponse:
        errors = [{"loc": [str(p) for p in e["loc"]], "msg": e["msg"], "type": e["type"]} for e in err.errors()]
        detail = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors)
        return problem_response(request, "validation-error", detail, errors=errors)

    @app.exception_handler(HTTPException)
    async def on_http(request: Request, err: HTTPException) -> JSONResponse:
        slug = HTTP_PROBLEMS.get(err.status_code, "internal-error" if err.status_code >= 500 else "validation-error")
        return problem_response(request, slug, str(err.detail), err.headers)

    @app.exception_handler(ClientDisconnect)
    async def on_disconnect(request: Request, err: ClientDisconnect) -> JSONResponse:
        return problem_response(request, "validation-error", "The client went away before sending the whole body.")

    @app.exception_handler(Exception)
    async def on_crash(request: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(request, "internal-error")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = connect(settings)
        events = connect_async(settings)
        store = make_store(settings, redis)
        job_store = JobStore(redis, settings, store)
        probes = ProbePool(settings)
        threading.Thread(target=probes.start, name="mmaudio-probe-start", daemon=True).start()
        app.state.mmaudio = AppState(
            settings=settings,
            redis=redis,
            events=events,
            store=store,
            jobs=job_store,
            results=Results(store),
            submitter=Submitter(redis, settings, job_store, store, probes),
            keyring=KeyRing.from_settings(settings),
        )
        registry = CollectorRegistry()
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=registry)
        registry.register(RedisCollector(redis, settings))
        app.state.metrics_registry = registry
        webhooks = WebhookSender(redis, settings, job_store)
        upkeep = MaintenanceThread(
            Maintenance(redis, job_store, store, webhooks), settings.maintenance_interval_seconds
        )
        upkeep.start()
        try:
            yield
        finally:
            upkeep.stop()
            webhooks.close()
            probes.close()
            await events.aclose()
            redis.close()

    app = FastAPI(
        title="MMAudio service",
        version="1",
        summary="Video, image or text to audio with MMAudio; queued jobs run on long-lived GPU workers.",
        description=API_DESCRIPTION,
        lifespan=lifespan,
    )
    install_error_handlers(app, settings)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "HEAD", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Prefer", "Range", "Cancel-After"],
            expose_headers=["Location", "Retry-After", "Preference-Applied", "Idempotent-Replayed", "Content-Range"],
        )
    app.include_router(jobs.router)
    app.include_router(health.router)
    app.include_router(page.router)
    app.mount("/static", StaticFiles(directory=page.STATIC_DIR), name="static")
    return app


app = create_app()
