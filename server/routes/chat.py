"""POST /v1/chat/completions: OpenAI's Chat Completions with `input_audio` parts, JSON or SSE."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from server.completions import (
    CompletionContext,
    answer_completion,
    make_sampling,
    new_request,
    require_audio_support,
    start_events,
)
from server.deps import MetricsDep, ServedModelDep, SettingsDep, WorkerDep, require_api_key
from server.schemas import ChatCompletion, ChatCompletionRequest, error_responses

ROUTE = "/v1/chat/completions"

router = APIRouter(prefix="/v1", tags=["chat"], dependencies=[Depends(require_api_key)])


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE chunks"},
        **error_responses(400, 401, 413, 415, 422, 429),
    },
)
async def create_chat_completion(
    body: ChatCompletionRequest,
    request: Request,
    worker: WorkerDep,
    settings: SettingsDep,
    model: ServedModelDep,
    metrics: MetricsDep,
) -> Response:
    """Answer a whole conversation (stateless; the worker reuses cached prefixes)."""
    ctx = CompletionContext(model=model.name, route=ROUTE, metrics=metrics)
    require_audio_support(model, [message.content for message in body.messages])
    params = make_sampling(body, settings)
    messages = [message.to_worker() for message in body.messages]
    events = await start_events(worker, new_request(params, messages=messages))
    return await answer_completion(request, events, ctx, body)
