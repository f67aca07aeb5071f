"""Injected things as `Annotated` aliases: settings, the worker, metrics, the served model.

Everything lives on `app.state`, set by the lifespan, so each app built by `create_app` (tests
build several) carries its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection

from server.auth import verify_api_key
from server.completions import ServedModel
from server.errors import APIError
from server.metrics import Metrics
from server.session_registry import SessionRegistry
from server.settings import Settings

if TYPE_CHECKING:
    from server.worker import Worker


def get_app_settings(connection: HTTPConnection) -> Settings:
    return connection.app.state.settings


def get_worker(connection: HTTPConnection) -> Worker:
    worker = getattr(connection.app.state, "worker", None)
    if worker is None:
        raise APIError(503, "the model is not loaded yet", code="not_ready")
    return worker


def get_metrics(connection: HTTPConnection) -> Metrics:
    return connection.app.state.metrics


def get_served_model(connection: HTTPConnection) -> ServedModel:
    model = getattr(connection.app.state, "served_model", None)
    if model is None:
        raise APIError(503, "the model is not loaded yet", code="not_ready")
    return model


def get_registry(connection: HTTPConnection) -> SessionRegistry:
    registry = getattr(connection.app.state, "registry", None)
    if registry is None:
        raise APIError(503, "the model is not loaded yet", code="not_ready")
    return registry


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
ServedModelDep = Annotated[ServedModel, Depends(get_served_model)]
RegistryDep = Annotated[SessionRegistry, Depends(get_registry)]
if TYPE_CHECKING:
    WorkerDep = Annotated[Worker, Depends(get_worker)]
else:  # the worker module is imported only when the app starts
    WorkerDep = Annotated[object, Depends(get_worker)]


def require_api_key(connection: HTTPConnection, settings: SettingsDep) -> None:
    """Router-level dependency: 401 unless a configured API key is presented."""
    verify_api_key(connection, settings.api_keys)
