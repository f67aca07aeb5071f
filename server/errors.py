"""Every error the API can answer, mapped in one place to an HTTP status in OpenAI's error shape.

Route code raises typed errors (`model.errors.*`, the worker's `UnknownSessionError` and
`WorkerBusyError`, or `APIError` for the API layer's own checks); the handlers installed here
turn each into `{"error": {"message", "type", "param", "code"}}`. The WebSocket and the SSE
streams reuse `describe_error` so a mistake reads the same on every transport.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from model import errors as model_errors
from server.protocol import UnknownSessionError, WorkerBusyError

log = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"

# most specific first: UnsupportedAudioFormatError is an AudioDecodeError
_STATUS_BY_CLASS: tuple[tuple[type[BaseException], int, str], ...] = (
    (model_errors.UnsupportedAudioFormatError, 415, "unsupported_audio_format"),
    (model_errors.AudioTooLongError, 413, "audio_too_long"),
    (model_errors.AudioDecodeError, 400, "invalid_audio"),
    (model_errors.MessageFormatError, 400, "invalid_messages"),
    (UnknownSessionError, 404, "session_not_found"),
    (WorkerBusyError, 429, "server_busy"),
)
_TYPE_BY_STATUS = {401: INVALID_REQUEST, 429: "rate_limit_error"}
_CODE_BY_STATUS = {
    400: "bad_request",
    401: "invalid_api_key",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "invalid_value",
}


class APIError(Exception):
    """A mistake the API layer itself detects (auth, limits, unsupported options)."""

    def __init__(
        self, status: int, message: str, code: str | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or _CODE_BY_STATUS.get(status)
        self.param = param


@dataclass(frozen=True)
class ErrorInfo:
    """One error as OpenAI shapes it, plus the HTTP status it travels with."""

    status: int
    message: str
    type: str
    code: str | None = None
    param: str | None = None

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def error_type(status: int) -> str:
    return SERVER_ERROR if status >= 500 else _TYPE_BY_STATUS.get(status, INVALID_REQUEST)


def describe_error(error: BaseException) -> ErrorInfo:
    """Any exception -> the status, message and code a client is shown (5xx only for bugs)."""
    if isinstance(error, APIError):
        return ErrorInfo(
            error.status, error.message, error_type(error.status), error.code, error.param
        )
    for cls, status, code in _STATUS_BY_CLASS:
        if isinstance(error, cls):
            message = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
            return ErrorInfo(status, message, error_type(status), code)
    log.exception("internal error", exc_info=error)
    return ErrorInfo(500, "internal server error", SERVER_ERROR, "internal_error")


def describe_worker_error(code: str, message: str) -> ErrorInfo:
    """A worker `ErrorEvent` (its `code` names a `model.errors` class) -> an error to show."""
    cls = getattr(model_errors, code, None)
    for known, status, api_code in _STATUS_BY_CLASS:
        if isinstance(cls, type) and issubclass(cls, known):
            return ErrorInfo(status, message, error_type(status), api_code)
    return ErrorInfo(
        500, message or "internal server error", SERVER_ERROR, code or "internal_error"
    )


def error_response(info: ErrorInfo, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(info.body(), status_code=info.status, headers=headers)


def describe_validation(error: RequestValidationError) -> ErrorInfo:
    """Request validation -> 400 for a body that is not JSON, else 422 naming the field."""
    problems = list(error.errors())
    if any(p.get("type") == "json_invalid" for p in problems):
        return ErrorInfo(400, "request body is not valid JSON", INVALID_REQUEST, "invalid_json")
    first = problems[0] if problems else {}
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request")
    if param:
        message = f"{param}: {message}"
    if len(problems) > 1:
        message += f" (and {len(problems) - 1} more problem(s))"
    return ErrorInfo(422, message, INVALID_REQUEST, "invalid_value", param)


async def _handle_api_error(request: Request, error: Exception) -> JSONResponse:
    info = describe_error(error)
    headers = {"WWW-Authenticate": "Bearer"} if info.status == 401 else None
    return error_response(info, headers)


async def _handle_validation(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    return error_response(describe_validation(error))


async def _handle_http(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    status = error.status_code
    message = error.detail if isinstance(error.detail, str) else "request failed"
    info = ErrorInfo(status, message, error_type(status), _CODE_BY_STATUS.get(status))
    return error_response(info, getattr(error, "headers", None))


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that give every failure OpenAI's error shape."""
    app.add_exception_handler(RequestValidationError, _handle_validation)
    app.add_exception_handler(StarletteHTTPException, _handle_http)
    for cls in (APIError, model_errors.SpeechChatModelError, UnknownSessionError, WorkerBusyError):
        app.add_exception_handler(cls, _handle_api_error)
    app.add_exception_handler(Exception, _handle_api_error)
