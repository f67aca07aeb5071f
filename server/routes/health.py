"""Liveness, readiness and Prometheus metrics; open without an API key, like most probes."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from server.deps import MetricsDep
from server.metrics import CONTENT_TYPE
from server.schemas import HealthStatus

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthStatus)
async def healthz() -> HealthStatus:
    """The process is up and serving HTTP."""
    return HealthStatus(status="ok")


@router.get("/readyz", response_model=HealthStatus, responses={503: {"model": HealthStatus}})
async def readyz(request: Request) -> Response:
    """200 once the model is loaded and the worker runs; 503 before (or while shutting down)."""
    state = request.app.state
    model = getattr(state, "served_model", None)
    if getattr(state, "worker", None) is None or model is None:
        return JSONResponse(HealthStatus(status="not_ready").model_dump(), status_code=503)
    return JSONResponse(
        HealthStatus(status="ready", model=model.name, audio=model.has_audio).model_dump()
    )


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}}})
async def metrics(metrics: MetricsDep) -> Response:
    return Response(metrics.render(), media_type=CONTENT_TYPE)
