"""WS /v1/realtime: the text-output subset of OpenAI's Realtime API (GA event names and shapes).

The openai SDK's `client.realtime.connect(model=...)` reaches this route when its
`websocket_base_url` is `ws://<host>:<port>/v1`; the `model` query parameter is accepted and
ignored (one model is served).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse

from server.auth import SUBPROTOCOL_KEY_PREFIX, verify_api_key
from server.errors import APIError, describe_error
from server.protocol import WorkerBusyError
from server.realtime import RealtimeConnection
from server.realtime_events import error_event
from server.vad import load_vad_model

log = logging.getLogger(__name__)

REALTIME_SUBPROTOCOL = "realtime"
CLOSE_TRY_AGAIN = 1013  # WebSocket close code: try again later
CLOSE_POLICY = 1008  # WebSocket close code: policy violation (bad credentials)

router = APIRouter(prefix="/v1", tags=["realtime"])


async def deny(websocket: WebSocket, error: APIError) -> None:
    """Refuse the handshake with an HTTP error when the server can, else close the socket."""
    info = describe_error(error)
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(JSONResponse(info.body(), status_code=info.status))
    else:
        await websocket.close(code=CLOSE_POLICY, reason=info.message[:120])


def pick_subprotocol(websocket: WebSocket) -> str | None:
    offered = websocket.scope.get("subprotocols", [])
    if REALTIME_SUBPROTOCOL in offered:
        return REALTIME_SUBPROTOCOL
    return next((p for p in offered if not p.startswith(SUBPROTOCOL_KEY_PREFIX)), None)


@router.websocket("/realtime")
async def realtime(websocket: WebSocket) -> None:
    state = websocket.app.state
    try:
        verify_api_key(websocket, state.settings.api_keys)
        if state.worker is None:
            raise APIError(503, "the model is not loaded yet", code="not_ready")
    except APIError as error:
        await deny(websocket, error)
        return
    await websocket.accept(subprotocol=pick_subprotocol(websocket))
    state.metrics.realtime_connections.inc()
    lock = asyncio.Lock()

    async def emit(payload: dict[str, Any]) -> None:
        async with lock:  # deltas from the response task and replies from the loop interleave
            await websocket.send_text(json.dumps(payload))

    vad_model = await asyncio.to_thread(load_vad_model)
    connection = RealtimeConnection(
        emit, state.worker, state.settings, state.served_model, state.metrics, vad_model
    )
    try:
        await connection.open()
    except WorkerBusyError as error:
        await emit(error_event("server_busy", str(error.args[0] if error.args else error)))
        await websocket.close(code=CLOSE_TRY_AGAIN)
        return
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            await connection.handle(message.get("text"), message.get("bytes"))
    except WebSocketDisconnect:
        pass
    finally:
        await connection.close()
