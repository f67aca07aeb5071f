"""Chat Completions over the worker: sampling settings, one response collected or streamed as SSE.

Route functions stay thin: they build a `GenerateRequest`, and this module runs it, answering in
OpenAI's `chat.completion` / `chat.completion.chunk` shapes and recording TTFT and tokens/s.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from server.errors import APIError, describe_worker_error
from server.metrics import GenerationTimer, Metrics
from server.protocol import (
    ErrorEvent,
    Event,
    Finished,
    GenerateRequest,
    SamplingParams,
    TextDelta,
    Usage,
)
from server.schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChunkChoice,
    ChunkDelta,
    CompletionUsage,
    Content,
    PromptTokensDetails,
    SamplingFields,
    content_has_audio,
    now_seconds,
)
from server.settings import Settings

if TYPE_CHECKING:
    from server.worker import Worker

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_DONE = "data: [DONE]\n\n"
CLIENT_CLOSED = 499  # nginx's status for a request the client abandoned
MAX_STOP_SEQUENCES = 4  # as OpenAI


@dataclass(frozen=True)
class ServedModel:
    """What /v1/models shows and what every response names."""

    name: str
    has_audio: bool
    created: int = field(default_factory=now_seconds)


@dataclass
class CompletionContext:
    """One response's identity and timing, shared by the JSON and SSE answers."""

    model: str
    route: str
    metrics: Metrics
    session_id: str | None = None
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=now_seconds)
    timer: GenerationTimer = field(default_factory=GenerationTimer)

    def record(self, completion_tokens: int) -> None:
        ttft, decode = self.timer.ttft, self.timer.decode_seconds
        self.metrics.observe_generation(self.route, ttft, completion_tokens, decode)


def make_sampling(fields: SamplingFields, settings: Settings) -> SamplingParams:
    """A request's sampling fields -> `SamplingParams`, with the server's defaults and caps."""
    max_tokens = fields.max_completion_tokens or fields.max_tokens or settings.default_max_tokens
    if max_tokens > settings.max_tokens_limit:
        raise APIError(
            422,
            f"max_tokens {max_tokens} exceeds this server's limit of {settings.max_tokens_limit}",
            param="max_tokens",
        )
    stops = fields.stop_sequences()
    if len(stops) > MAX_STOP_SEQUENCES:
        raise APIError(422, f"at most {MAX_STOP_SEQUENCES} stop sequences", param="stop")
    temperature = settings.default_temperature if fields.temperature is None else fields.temperature
    top_p = 1.0 if fields.top_p is None else fields.top_p
    return SamplingParams(max_tokens, temperature, top_p, fields.seed, stops)


def require_audio_support(model: ServedModel, contents: list[Content | None]) -> None:
    """422 for audio input when the server runs text only (no encoder loaded)."""
    if not model.has_audio and any(content_has_audio(c) for c in contents):
        raise APIError(
            422,
            "this server has no audio encoder loaded (text only); send text content, or start "
            "it with --encoder pointing at an encoder checkpoint",
            code="audio_not_supported",
        )


def new_request(params: SamplingParams, **target: object) -> GenerateRequest:
    return GenerateRequest(request_id=f"req_{uuid.uuid4().hex}", params=params, **target)


async def start_events(worker: Worker, request: GenerateRequest) -> AsyncIterator[Event]:
    """Start generating; client mistakes raise here, before any byte of the answer is sent."""
    events = worker.generate(request)
    first = await anext(events)
    return _prepend(first, events)


async def _prepend(first: Event, rest: AsyncIterator[Event]) -> AsyncIterator[Event]:
    try:
        yield first
        async for event in rest:
            yield event
    finally:
        await rest.aclose()  # type: ignore[attr-defined]  # cancels the request if unfinished


def usage_of(usage: Usage | None) -> CompletionUsage:
    if usage is None:
        return CompletionUsage(prompt_tokens=0, completion_tokens=0, total_tokens=0)
    return CompletionUsage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_tokens),
    )


async def collect_completion(
    events: AsyncIterator[Event], ctx: CompletionContext
) -> ChatCompletion:
    """Run a response to its end and answer it as one `chat.completion`."""
    texts: list[str] = []
    usage: Usage | None = None
    reason = "stop"
    async for event in events:
        if isinstance(event, TextDelta):
            ctx.timer.mark_delta()
            texts.append(event.text)
        elif isinstance(event, Usage):
            usage = event
        elif isinstance(event, ErrorEvent):
            info = describe_worker_error(event.code, event.message)
            raise APIError(info.status, info.message, info.code)
        elif isinstance(event, Finished):
            reason = event.reason
    if reason not in ("stop", "length"):
        raise APIError(503, f"the response ended early ({reason})", code="response_" + reason)
    result = usage_of(usage)
    ctx.record(result.completion_tokens)
    choice = Choice(message=AssistantMessage(content="".join(texts)), finish_reason=reason)
    return ChatCompletion(
        id=ctx.id,
        created=ctx.created,
        model=ctx.model,
        choices=[choice],
        usage=result,
        session_id=ctx.session_id,
    )


def _chunk(
    ctx: CompletionContext, choices: list[ChunkChoice], usage: CompletionUsage | None = None
) -> str:
    chunk = ChatCompletionChunk(
        id=ctx.id, created=ctx.created, model=ctx.model, choices=choices, usage=usage
    )
    return f"data: {chunk.model_dump_json(exclude_none=False)}\n\n"


async def stream_completion(
    events: AsyncIterator[Event], ctx: CompletionContext, include_usage: bool
) -> AsyncIterator[str]:
    """A response as Server-Sent Events in OpenAI's chunk format, ending with `[DONE]`.

    The finishing chunk carries `usage` as well; with `stream_options.include_usage` a separate
    usage chunk with no choices follows, as OpenAI sends it.
    """
    usage: Usage | None = None
    try:
        yield _chunk(ctx, [ChunkChoice(delta=ChunkDelta(role="assistant", content=""))])
        async for event in events:
            if isinstance(event, TextDelta) and event.text:
                ctx.timer.mark_delta()
                yield _chunk(ctx, [ChunkChoice(delta=ChunkDelta(content=event.text))])
            elif isinstance(event, Usage):
                usage = event
            elif isinstance(event, ErrorEvent):
                info = describe_worker_error(event.code, event.message)
                yield f"data: {json.dumps(info.body())}\n\n"
                return
            elif isinstance(event, Finished) and event.reason in ("stop", "length"):
                result = usage_of(usage)
                ctx.record(result.completion_tokens)
                done = ChunkChoice(delta=ChunkDelta(), finish_reason=event.reason)
                yield _chunk(ctx, [done], result)
                if include_usage:
                    yield _chunk(ctx, [], result)
        yield SSE_DONE
    finally:
        await events.aclose()  # type: ignore[attr-defined]


async def wait_disconnect(request: Request) -> None:
    """Return once the client has gone (the body has already been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect_or_abandon(
    request: Request, events: AsyncIterator[Event], ctx: CompletionContext
) -> ChatCompletion | None:
    """Collect a response, or cancel it (freeing its slot) if the client disconnects first."""
    collect = asyncio.ensure_future(collect_completion(events, ctx))
    gone = asyncio.ensure_future(wait_disconnect(request))
    try:
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if collect.done():
        return collect.result()
    collect.cancel()
    await asyncio.gather(collect, return_exceptions=True)
    await events.aclose()  # type: ignore[attr-defined]
    return None


async def answer_completion(
    request: Request, events: AsyncIterator[Event], ctx: CompletionContext, fields: SamplingFields
) -> Response:
    """Stream the response as SSE when asked, else answer one JSON `chat.completion`."""
    if fields.stream:
        include_usage = bool(fields.stream_options and fields.stream_options.include_usage)
        return StreamingResponse(
            stream_completion(events, ctx, include_usage),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )
    completion = await collect_or_abandon(request, events, ctx)
    if completion is None:
        return Response(status_code=CLIENT_CLOSED)
    return JSONResponse(completion.model_dump(mode="json"))
