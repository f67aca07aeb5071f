"""Typed messages between the API layer and the worker, all in one file.

The API layer sends OpenAI-format message dicts and sampling settings; the worker answers with
events. No tensor crosses back out; no FastAPI object crosses in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from model.decoding import SamplingParams

FinishReason = Literal["stop", "length", "cancelled", "error"]

__all__ = [
    "SamplingParams",
    "GenerateRequest",
    "TextDelta",
    "Usage",
    "Finished",
    "ErrorEvent",
    "Event",
    "TurnInfo",
    "WorkerStats",
    "UnknownSessionError",
    "WorkerBusyError",
]


@dataclass(frozen=True)
class GenerateRequest:
    """One response to produce: for a session (stateful) or for a whole conversation (stateless)."""

    request_id: str
    params: SamplingParams
    session_id: str | None = None  # answer the session's history as it stands
    messages: list[dict[str, Any]] | None = None  # or a full OpenAI-format conversation


@dataclass(frozen=True)
class TextDelta:
    request_id: str
    text: str


@dataclass(frozen=True)
class Usage:
    request_id: str
    prompt_tokens: int  # positions prefilled for this request's prompt, audio embeddings included
    completion_tokens: int
    cached_tokens: int  # prompt positions reused from a KV cache instead of recomputed
    # s from the worker taking the request (its prompt planned) to its first token sampled
    # (None: no token); the first text can come later, when that token is part of a character
    # or of a possible stop string
    first_token_s: float | None = None


@dataclass(frozen=True)
class Finished:
    request_id: str
    reason: FinishReason


@dataclass(frozen=True)
class ErrorEvent:
    request_id: str
    code: str  # a model/errors.py class name, or "internal_error"
    message: str


Event = TextDelta | Usage | Finished | ErrorEvent


@dataclass(frozen=True)
class TurnInfo:
    """A history entry as the API shows it: audio appears as audio with its duration."""

    role: str
    text: str
    audio_seconds: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class WorkerStats:
    active_sessions: int
    running_requests: int
    kv_cache_bytes: int
    kv_budget_bytes: int
    audio_seconds_total: float


class UnknownSessionError(KeyError):
    """No session with this id (never opened, closed, or expired)."""


class WorkerBusyError(RuntimeError):
    """The worker holds as many sessions as its settings allow."""
