"""Stateful sessions: create, read history, delete, and add a user turn (JSON, audio or upload).

A turn's body is JSON (`TurnRequest`) or `multipart/form-data` with an audio `file` plus the same
fields as form values; the answer is a `chat.completion` (with `session_id`) or its SSE stream.
"""

from __future__ import annotations

import base64
import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile

from server.completions import (
    CompletionContext,
    answer_completion,
    make_sampling,
    new_request,
    require_audio_support,
    start_events,
)
from server.deps import (
    MetricsDep,
    RegistryDep,
    ServedModelDep,
    SettingsDep,
    WorkerDep,
    require_api_key,
)
from server.errors import APIError
from server.protocol import TurnInfo
from server.schemas import (
    ChatCompletion,
    HistoryMessage,
    HistoryPart,
    SessionCreateRequest,
    SessionDeleted,
    SessionObject,
    TurnRequest,
    dump_content,
    error_responses,
)

ROUTE = "/v1/sessions/{session_id}/turns"
JSON_TYPE = "application/json"
MULTIPART_TYPE = "multipart/form-data"
FORM_SCALARS = ("text", "format", "sample_rate", "max_tokens", "max_completion_tokens")
FORM_SAMPLING = ("temperature", "top_p", "seed", "stream")

router = APIRouter(prefix="/v1", tags=["sessions"], dependencies=[Depends(require_api_key)])


def render_history(turns: list[TurnInfo]) -> list[HistoryMessage]:
    """Worker history -> messages whose audio shows as audio with its duration."""
    messages = []
    for turn in turns:
        parts = [HistoryPart(type="input_audio", duration_seconds=s) for s in turn.audio_seconds]
        if turn.text:
            parts.append(HistoryPart(type="text", text=turn.text))
        messages.append(HistoryMessage(role=turn.role, content=parts))
    return messages


async def turn_from_form(form: FormData) -> dict[str, Any]:
    """A multipart turn -> the JSON body it stands for (the upload becomes base64 audio)."""
    data: dict[str, Any] = {
        key: form[key] for key in FORM_SCALARS + FORM_SAMPLING if isinstance(form.get(key), str)
    }
    stops = [s for s in form.getlist("stop") if isinstance(s, str)]
    if stops:
        data["stop"] = stops
    upload = form.get("file")
    if upload is not None and not isinstance(upload, UploadFile):
        raise APIError(422, "'file' must be an uploaded audio file", param="file")
    if upload is not None:
        raw = await upload.read()
        data["audio"] = {
            "data": base64.b64encode(raw).decode("ascii"),
            "format": data.pop("format", None),
            "sample_rate": data.pop("sample_rate", None),
        }
    return data


async def read_turn_request(request: Request, settings: SettingsDep) -> TurnRequest:
    """Parse a turn from JSON or multipart; 400 for bad JSON, 415 for other body types."""
    media_type = request.headers.get("content-type", JSON_TYPE).split(";")[0].strip().lower()
    if media_type == MULTIPART_TYPE:
        async with request.form(max_part_size=settings.max_request_bytes) as form:
            data: Any = await turn_from_form(form)
    elif media_type == JSON_TYPE or media_type.endswith("+json"):
        try:
            data = json.loads(await request.body())
        except ValueError as error:
            raise APIError(
                400, f"request body is not valid JSON: {error}", "invalid_json"
            ) from error
    else:
        raise APIError(
            415,
            f"send {JSON_TYPE} or {MULTIPART_TYPE}, not {media_type!r}",
            "unsupported_media_type",
        )
    try:
        return TurnRequest.model_validate(data)
    except ValidationError as error:
        raise RequestValidationError(error.errors(include_url=False), body=None) from error


TURN_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            JSON_TYPE: {"schema": {"$ref": "#/components/schemas/TurnRequest"}},
            MULTIPART_TYPE: {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "text": {"type": "string"},
                        "format": {"type": "string"},
                        "stream": {"type": "boolean"},
                        "max_tokens": {"type": "integer"},
                        "temperature": {"type": "number"},
                    },
                }
            },
        },
    }
}


@router.post(
    "/sessions",
    status_code=201,
    response_model=SessionObject,
    responses=error_responses(401, 422, 429),
)
async def create_session(
    registry: RegistryDep, body: SessionCreateRequest | None = None
) -> SessionObject:
    system_prompt = body.system_prompt if body else None
    session_id, record = registry.open(system_prompt)
    return SessionObject(id=session_id, created=record.created, system_prompt=system_prompt)


@router.get(
    "/sessions/{session_id}",
    response_model=SessionObject,
    response_model_exclude_none=True,
    responses=error_responses(401, 404),
)
async def get_session(session_id: str, registry: RegistryDep, worker: WorkerDep) -> SessionObject:
    record = registry.touch(session_id)
    return SessionObject(
        id=session_id,
        created=record.created,
        system_prompt=record.system_prompt,
        messages=render_history(worker.history(session_id)),
    )


@router.delete(
    "/sessions/{session_id}", response_model=SessionDeleted, responses=error_responses(401, 404)
)
async def delete_session(session_id: str, registry: RegistryDep) -> SessionDeleted:
    registry.close(session_id)
    return SessionDeleted(id=session_id)


@router.post(
    "/sessions/{session_id}/turns",
    response_model=ChatCompletion,
    openapi_extra=TURN_BODY,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE chunks"},
        **error_responses(400, 401, 404, 413, 415, 422),
    },
)
async def create_turn(
    session_id: str,
    request: Request,
    turn: Annotated[TurnRequest, Depends(read_turn_request)],
    registry: RegistryDep,
    worker: WorkerDep,
    settings: SettingsDep,
    model: ServedModelDep,
    metrics: MetricsDep,
) -> Response:
    """Append a user turn to the session and answer it; the answer joins the history."""
    ctx = CompletionContext(model=model.name, route=ROUTE, metrics=metrics, session_id=session_id)
    registry.touch(session_id)
    content = turn.to_content()
    if content is None:
        raise APIError(422, "a turn needs 'content', 'text' or 'audio'", param="content")
    require_audio_support(model, [content])
    params = make_sampling(turn, settings)
    await worker.append_messages(session_id, [{"role": "user", "content": dump_content(content)}])
    events = await start_events(worker, new_request(params, session_id=session_id))
    return await answer_completion(request, events, ctx, turn)
