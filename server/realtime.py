"""One Realtime WebSocket conversation: client events in, server events out, VAD turns, barge-in.

Each connection owns a worker session. Audio appended while the user speaks goes straight to
the worker (which encodes it as it arrives); with server VAD the turn is committed when speech
stops and a response starts at once. Speech starting while a response streams cancels it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from model.errors import SpeechChatModelError
from server.completions import ServedModel
from server.errors import describe_error, describe_worker_error
from server.metrics import GenerationTimer, Metrics
from server.protocol import (
    ErrorEvent,
    Finished,
    GenerateRequest,
    SamplingParams,
    TextDelta,
    UnknownSessionError,
    Usage,
)
from server.realtime_events import (
    ProtocolError,
    RealtimeConfig,
    assistant_item,
    decode_pcm,
    error_event,
    event,
    item_to_message,
    merge_session_update,
    new_id,
    response_object,
    session_object,
    user_item,
)
from server.settings import Settings
from server.vad import PCM_BYTES, PreSpeechBuffer, TurnDetector

if TYPE_CHECKING:
    import torch

    from server.worker import Worker

log = logging.getLogger(__name__)

ROUTE = "/v1/realtime"
MS_PER_SECOND = 1000
PREFIX_SLACK_MS = 1000  # ms of pre-speech audio kept beyond prefix_padding_ms
STATUS_BY_FINISH = {"stop": "completed", "length": "incomplete", "cancelled": "cancelled"}

Emit = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class ActiveResponse:
    id: str
    item_id: str
    timer: GenerationTimer
    cancel_reason: str | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class RealtimeConnection:
    """The protocol state of one socket; `handle` takes each client event in order."""

    def __init__(
        self,
        emit: Emit,
        worker: Worker,
        settings: Settings,
        model: ServedModel,
        metrics: Metrics,
        vad_model: torch.nn.Module,
    ) -> None:
        self.emit, self.worker, self.settings = emit, worker, settings
        self.model, self.metrics, self.vad_model = model, metrics, vad_model
        self.config = RealtimeConfig()
        self.session_id = ""
        self.realtime_id = new_id("sess")
        self.items: list[str] = []
        self.active: ActiveResponse | None = None
        self.detector: TurnDetector | None = None
        self.pre_speech = PreSpeechBuffer(self.config.rate)
        self.speech_item: str | None = None  # item id of the turn being spoken
        self.buffered_ms = 0.0  # audio pushed to the worker since the last commit
        self.speech_stopped_at: float | None = None
        self._reset_vad()

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the worker session (`WorkerBusyError` when full) and greet the client."""
        self.session_id = self.worker.open_session(self.config.instructions or None)
        await self.emit(event("session.created", session=self._session()))

    async def close(self) -> None:
        """The client is gone: stop any response and free the session's cache."""
        if self.active is not None and self.active.task is not None:
            self.active.task.cancel()
            await asyncio.gather(self.active.task, return_exceptions=True)
        if self.session_id and self.worker.has_session(self.session_id):
            self.worker.close_session(self.session_id)

    def _session(self) -> dict[str, Any]:
        return session_object(self.config, self.realtime_id, self.model.name)

    def _reset_vad(self) -> None:
        vad = self.config.vad
        self.detector = None if vad is None else TurnDetector(self.vad_model, self.config.rate, vad)
        self.pre_speech = PreSpeechBuffer(self.config.rate)

    # -- dispatch --------------------------------------------------------------------------

    async def handle(self, text: str | None, data: bytes | None) -> None:
        """One WebSocket message; every mistake becomes an `error` event, the socket stays open."""
        event_id = None
        try:
            if text is None:
                raise ProtocolError("invalid_event", "send JSON text frames, not binary ones")
            try:
                message = json.loads(text)
            except ValueError as error:
                raise ProtocolError("invalid_json", f"event is not valid JSON: {error}") from error
            if not isinstance(message, dict) or not isinstance(message.get("type"), str):
                raise ProtocolError("invalid_event", "an event must be an object with a 'type'")
            event_id = message.get("event_id")
            handler = self.HANDLERS.get(message["type"])
            if handler is None:
                raise ProtocolError(
                    "unknown_event_type",
                    f"unknown or unsupported event type {message['type']!r}",
                    "type",
                )
            await handler(self, message)
        except ProtocolError as error:
            await self.emit(error_event(error.code, error.message, error.param, event_id))
        except (SpeechChatModelError, UnknownSessionError) as error:
            info = describe_error(error)
            await self.emit(
                error_event(info.code or "invalid_request", info.message, None, event_id)
            )

    async def on_session_update(self, message: dict[str, Any]) -> None:
        config = merge_session_update(self.config, message.get("session"))
        if config.instructions != self.config.instructions:
            self._reopen_session(config.instructions)
        audio_changed = (config.rate, config.vad) != (self.config.rate, self.config.vad)
        self.config = config
        if audio_changed:
            self._reset_vad()
        await self.emit(event("session.updated", session=self._session()))

    def _reopen_session(self, instructions: str) -> None:
        """New instructions become the session's system prompt (before any item is added)."""
        if self.items or self.buffered_ms:
            raise ProtocolError(
                "instructions_locked",
                "instructions can only change before the first conversation item",
                "session.instructions",
            )
        self.worker.close_session(self.session_id)
        self.session_id = self.worker.open_session(instructions or None)

    async def on_append(self, message: dict[str, Any]) -> None:
        pcm = decode_pcm(message.get("audio"))
        if not self.model.has_audio:
            raise ProtocolError(
                "audio_not_supported",
                "this server has no audio encoder loaded (text only); use conversation.item.create",
            )
        if self.detector is None:
            await self._push(pcm)
            return
        speaking = self.detector.speaking
        events = self.detector.feed(pcm)
        if speaking:
            await self._push(pcm)
            self.pre_speech.skip(pcm)
        else:
            keep = self.config.vad.prefix_padding_ms + PREFIX_SLACK_MS  # type: ignore[union-attr]
            self.pre_speech.append(pcm, keep)
        for found in events:
            if found.kind == "start":
                await self._speech_started(found.ms)
            else:
                await self._speech_stopped(found.ms)

    async def _push(self, pcm: bytes) -> None:
        self.buffered_ms += len(pcm) / PCM_BYTES * MS_PER_SECOND / self.config.rate
        if self.buffered_ms > self.settings.max_audio_seconds * MS_PER_SECOND:
            self._clear_buffer()
            raise ProtocolError(
                "audio_too_long",
                f"the input audio buffer passed {self.settings.max_audio_seconds:.0f} s; "
                "it was cleared",
            )
        await self.worker.push_audio(self.session_id, pcm, self.config.rate)

    async def _speech_started(self, ms: int) -> None:
        padding = self.config.vad.prefix_padding_ms if self.config.vad else 0
        start_ms = max(0, ms - padding)
        self.speech_item = new_id("item")
        await self.emit(
            event(
                "input_audio_buffer.speech_started",
                audio_start_ms=start_ms,
                item_id=self.speech_item,
            )
        )
        if self.active is not None and self.config.interrupt_response:
            self._cancel_active("turn_detected")
        await self._push(self.pre_speech.since(start_ms))
        self.pre_speech.skip(b"")

    async def _speech_stopped(self, ms: int) -> None:
        self.speech_stopped_at = time.perf_counter()
        item_id = self.speech_item or new_id("item")
        await self.emit(
            event("input_audio_buffer.speech_stopped", audio_end_ms=ms, item_id=item_id)
        )
        await self._commit(item_id)
        if self.config.create_response and self.active is None:
            self._start_response(GenerationTimer(self.speech_stopped_at))

    async def on_commit(self, message: dict[str, Any]) -> None:
        item_id = self.speech_item or new_id("item")
        if self.detector is not None:
            self.detector.reset()
        await self._commit(item_id)

    async def _commit(self, item_id: str) -> None:
        previous = self.items[-1] if self.items else None
        try:
            await self.worker.commit_audio(self.session_id)
        finally:
            self.speech_item, self.buffered_ms = None, 0.0
        self.items.append(item_id)
        await self.emit(
            event("input_audio_buffer.committed", item_id=item_id, previous_item_id=previous)
        )
        item = user_item(item_id, [{"type": "input_audio", "transcript": None}])
        await self._announce_item(item, previous)

    async def _announce_item(self, item: dict[str, Any], previous: str | None) -> None:
        await self.emit(event("conversation.item.added", item=item, previous_item_id=previous))
        await self.emit(event("conversation.item.done", item=item, previous_item_id=previous))

    async def on_clear(self, message: dict[str, Any]) -> None:
        self._clear_buffer()
        await self.emit(event("input_audio_buffer.cleared"))

    def _clear_buffer(self) -> None:
        self.worker.clear_audio(self.session_id)
        self.buffered_ms, self.speech_item = 0.0, None
        if self.detector is not None:
            self.detector.reset()
        self.pre_speech.skip(b"")

    async def on_item_create(self, message: dict[str, Any]) -> None:
        item = message.get("item")
        worker_message = item_to_message(item, self.config.rate)
        if (
            not self.model.has_audio
            and isinstance(worker_message["content"], list)
            and any(p["type"] == "input_audio" for p in worker_message["content"])
        ):
            raise ProtocolError("audio_not_supported", "this server has no audio encoder loaded")
        await self.worker.append_messages(self.session_id, [worker_message])
        item_id = item.get("id") or new_id("item")  # type: ignore[union-attr]
        previous = self.items[-1] if self.items else None
        self.items.append(item_id)
        shown = {**item, "id": item_id, "object": "realtime.item", "status": "completed"}  # type: ignore[dict-item]
        await self._announce_item(shown, previous)

    async def on_response_create(self, message: dict[str, Any]) -> None:
        if self.active is not None:
            raise ProtocolError(
                "conversation_already_has_active_response",
                f"response {self.active.id} is still in progress; cancel it or wait",
            )
        options = message.get("response") or {}
        limit = options.get("max_output_tokens") if isinstance(options, dict) else None
        self._start_response(GenerationTimer(), limit if isinstance(limit, int) else None)

    async def on_response_cancel(self, message: dict[str, Any]) -> None:
        wanted = message.get("response_id")
        if self.active is None or (wanted and wanted != self.active.id):
            raise ProtocolError(
                "response_cancel_not_active", "there is no active response to cancel"
            )
        self._cancel_active("client_cancelled")

    HANDLERS: dict[str, Callable[[RealtimeConnection, dict[str, Any]], Awaitable[None]]] = {
        "session.update": on_session_update,
        "input_audio_buffer.append": on_append,
        "input_audio_buffer.commit": on_commit,
        "input_audio_buffer.clear": on_clear,
        "conversation.item.create": on_item_create,
        "response.create": on_response_create,
        "response.cancel": on_response_cancel,
    }

    # -- responses -------------------------------------------------------------------------

    def _start_response(self, timer: GenerationTimer, limit: int | None = None) -> None:
        limit = limit or self.config.max_output_tokens or self.settings.default_max_tokens
        params = SamplingParams(
            max_new_tokens=min(limit, self.settings.max_tokens_limit),
            temperature=self.settings.default_temperature,
        )
        active = ActiveResponse(new_id("resp"), new_id("item"), timer)
        request = GenerateRequest(request_id=active.id, params=params, session_id=self.session_id)
        active.task = asyncio.create_task(self._run_response(active, request))
        self.active = active

    def _cancel_active(self, reason: str) -> None:
        if self.active is not None and self.active.cancel_reason is None:
            self.active.cancel_reason = reason
            self.worker.cancel(self.active.id)

    async def _run_response(self, active: ActiveResponse, request: GenerateRequest) -> None:
        previous = self.items[-1] if self.items else None
        self.items.append(active.item_id)
        try:
            await self._stream_response(active, request, previous)
        except Exception:  # a send to a closed socket, or a bug: never leave `active` set
            log.exception("realtime response %s failed", active.id)
        finally:
            if self.active is active:
                self.active = None

    async def _stream_response(
        self, active: ActiveResponse, request: GenerateRequest, previous: str | None
    ) -> None:
        rid, iid = active.id, active.item_id
        await self.emit(event("response.created", response=response_object(rid, "in_progress", [])))
        item = assistant_item(iid, None, "in_progress")
        await self.emit(
            event("response.output_item.added", response_id=rid, output_index=0, item=item)
        )
        await self._emit_item("conversation.item.added", item, previous)
        part = {"response_id": rid, "item_id": iid, "output_index": 0, "content_index": 0}
        await self.emit(
            event("response.content_part.added", **part, part={"type": "text", "text": ""})
        )
        texts, usage, status, error = [], None, "failed", None
        events = self.worker.generate(request)
        try:
            async for found in events:
                if isinstance(found, TextDelta) and found.text:
                    active.timer.mark_delta()
                    texts.append(found.text)
                    await self.emit(event("response.output_text.delta", **part, delta=found.text))
                elif isinstance(found, Usage):
                    usage = found
                elif isinstance(found, ErrorEvent):
                    info = describe_worker_error(found.code, found.message)
                    error = {"type": info.type, "code": info.code, "message": info.message}
                    await self.emit(error_event(info.code or "error", info.message, kind=info.type))
                elif isinstance(found, Finished):
                    status = STATUS_BY_FINISH.get(found.reason, "failed")
        finally:
            await events.aclose()  # type: ignore[attr-defined]
        text = "".join(texts)
        self.metrics.observe_generation(
            ROUTE,
            active.timer.ttft,
            usage.completion_tokens if usage else 0,
            active.timer.decode_seconds,
        )
        await self.emit(event("response.output_text.done", **part, text=text))
        await self.emit(
            event("response.content_part.done", **part, part={"type": "text", "text": text})
        )
        item = assistant_item(iid, text, "completed" if status == "completed" else "incomplete")
        await self.emit(
            event("response.output_item.done", response_id=rid, output_index=0, item=item)
        )
        await self._emit_item("conversation.item.done", item, previous)
        reason = active.cancel_reason if status == "cancelled" else None
        if status == "incomplete":
            reason = "max_output_tokens"
        done = response_object(rid, status, [item], usage, reason, error)
        await self.emit(event("response.done", response=done))

    async def _emit_item(self, kind: str, item: dict[str, Any], previous: str | None) -> None:
        await self.emit(event(kind, item=item, previous_item_id=previous))
