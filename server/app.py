"""The FastAPI app: settings in, model loaded once by the lifespan, routers and error handlers.

`create_app(settings, speech_llm=None)` builds the model from the settings when the server starts,
or serves an already-built `SpeechLLM` (tests pass a tiny one).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from model.checkpoint import DEFAULT_SPEC as DEFAULT_ENCODER
from model.checkpoint import load_encoder_spec
from model.errors import CheckpointFormatError, CheckpointMismatchError
from model.llm import load_llm
from model.speech_llm import SpeechLLM
from server.completions import ServedModel
from server.errors import install_error_handlers
from server.metrics import Metrics, RequestCounter
from server.routes import chat, health, models, realtime, sessions
from server.schemas import TurnRequest
from server.session_registry import SessionRegistry
from server.settings import Settings, get_settings
from server.threads import on_own_thread, single_threaded

log = logging.getLogger(__name__)

API_TITLE = "speechchat"
API_VERSION = "0.1.0"


def build_speech_llm(settings: Settings) -> SpeechLLM:
    """Load the LLM and encoder the settings name; a default encoder that is missing or was
    aligned to another LLM means text only (an explicitly named one must load)."""
    llm = load_llm(settings.llm, device=settings.device, dtype=settings.dtype)
    if settings.encoder is None:
        log.info("no encoder configured: serving text only")
        return SpeechLLM(llm)
    try:
        encoder, prompt = load_encoder_spec(settings.encoder, llm)
    except (CheckpointFormatError, CheckpointMismatchError) as error:
        if settings.encoder != DEFAULT_ENCODER:
            raise
        log.warning("%s; serving text only (audio requests get a 422)", error)
        return SpeechLLM(llm)
    return SpeechLLM(llm, encoder, prompt)


def limit_audio(speech_llm: SpeechLLM, max_seconds: float) -> None:
    """Apply the server's per-turn audio limit to the model's message parsing."""
    speech_llm.prompt = dataclasses.replace(speech_llm.prompt, max_audio_seconds=max_seconds)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    from server.worker import Worker  # imported here: the worker pulls in the engine

    settings: Settings = app.state.settings
    start = time.perf_counter()
    # loading runs multi-threaded on a thread that then ends; every thread but the engine's
    # keeps to one torch thread from here on (server/threads.py says why)
    speech_llm = app.state.speech_llm or await asyncio.to_thread(
        on_own_thread, build_speech_llm, settings
    )
    single_threaded()  # the event loop's thread
    limit_audio(speech_llm, settings.max_audio_seconds)
    worker = Worker(
        speech_llm,
        kv_budget_bytes=settings.kv_budget_bytes,
        max_sessions=settings.max_sessions,
        max_batch=settings.max_batch,
        prefill_chunk=settings.prefill_chunk,
        prefill_rows=settings.prefill_rows,
        decode_step=settings.decode_step,
        num_threads=settings.num_threads,
        stream_window_s=settings.stream_window_s,
        stream_prefill=settings.stream_prefill,
    )
    await worker.start()
    registry = SessionRegistry(worker, settings.session_idle_timeout_s)
    name = settings.served_model_name or speech_llm.llm.name
    app.state.served_model = ServedModel(name=name, has_audio=speech_llm.encoder is not None)
    app.state.registry = registry
    app.state.worker = worker
    sweeper = asyncio.create_task(registry.sweep_forever())
    log.info(
        "ready: %s (audio %s) in %.2f s",
        name,
        speech_llm.encoder is not None,
        time.perf_counter() - start,
    )
    try:
        yield
    finally:
        sweeper.cancel()
        app.state.worker = None
        await worker.stop()


class BodySizeLimit:
    """ASGI middleware: 413 for request bodies over the limit, declared or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, receive, send)
            return
        seen = 0

        async def receive_counting() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                # FastAPI re-raises HTTPExceptions from body reading; the app's handler shapes it
                raise StarletteHTTPException(413, self._message())
            return message

        await self.app(scope, receive_counting, send)

    def _message(self) -> str:
        return f"request body is larger than this server's limit of {self.max_bytes} bytes"

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        from server.errors import ErrorInfo, error_response

        info = ErrorInfo(413, self._message(), "invalid_request_error", "request_too_large")
        await error_response(info)(scope, receive, send)


def build_openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus `TurnRequest`, which the turns route parses itself (JSON or form)."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    turn = TurnRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(turn.pop("$defs", {}))
    components["TurnRequest"] = turn
    app.openapi_schema = schema
    return schema


def create_app(settings: Settings | None = None, speech_llm: SpeechLLM | None = None) -> FastAPI:
    """The app; `speech_llm` skips loading from settings (tests pass a tiny model)."""
    settings = settings or get_settings()
    app = FastAPI(title=API_TITLE, version=API_VERSION, lifespan=lifespan)
    app.state.settings = settings
    app.state.speech_llm = speech_llm
    app.state.worker = None
    app.state.metrics = Metrics(lambda: _worker_stats(app))
    for module in (chat, sessions, realtime, models, health):
        app.include_router(module.router)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
        )
    app.add_middleware(RequestCounter, metrics=lambda: app.state.metrics)
    app.openapi = lambda: build_openapi(app)  # type: ignore[method-assign]
    return app


def _worker_stats(app: FastAPI) -> Any:
    worker = getattr(app.state, "worker", None)
    return worker.stats() if worker is not None else None
