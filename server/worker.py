"""The worker: one owner of the model and device, many conversations at once, asyncio-facing.

Event-loop side only: sessions live here and are touched on the loop thread alone. Parsing,
audio decoding and encoding run on one encoder thread; forward passes run on the engine thread
(server/engine.py), whose events come back through `loop.call_soon_threadsafe` into one
`asyncio.Queue` per request. No tensor leaves this module.

Streamed audio (pushes, drafts at pauses, the commit, prefills of what was heard) is a mixin:
server/worker_audio.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from model.decoding import SamplingParams
from model.errors import MessageFormatError
from model.messages import AudioPart, Turn, parse_messages
from model.speech_llm import SpeechLLM
from server.engine import Engine
from server.engine_request import EngineRequest, PromptPlan, plan_prompt
from server.kv_cache import KVStore
from server.protocol import (
    Event,
    Finished,
    FinishReason,
    GenerateRequest,
    TurnInfo,
    UnknownSessionError,
    WorkerBusyError,
    WorkerStats,
)
from server.sessions import (
    ENCODED_AUDIO_BYTES,
    STREAM_WINDOW,
    EncodedAudio,
    Session,
    new_session,
)
from server.threads import single_threaded
from server.worker_audio import AudioStreaming

log = logging.getLogger(__name__)

DEFAULT_KV_BUDGET = 2 << 30  # bytes
T = TypeVar("T")


class Worker(AudioStreaming):
    """Sessions, stateless requests and streaming audio over one engine thread."""

    def __init__(
        self,
        speech_llm: SpeechLLM,
        *,
        kv_budget_bytes: int = DEFAULT_KV_BUDGET,
        max_sessions: int = 256,
        max_batch: int = 32,
        prefill_chunk: int = 512,
        prefill_rows: int = 8,
        decode_step: str = "lean",
        num_threads: int | None = None,
        stream_window_s: float = STREAM_WINDOW,
        stream_prefill: bool = True,
    ) -> None:
        self.speech_llm = speech_llm
        self.store = KVStore(kv_budget_bytes)
        self.engine = Engine(
            speech_llm.llm,
            self.store,
            max_batch=max_batch,
            prefill_chunk=prefill_chunk,
            prefill_rows=prefill_rows,
            decode_step=decode_step,
            num_threads=num_threads,
        )
        self.max_sessions = max_sessions
        self.stream_window_s = stream_window_s
        encoder = speech_llm.encoder
        if stream_window_s and encoder is not None and not encoder.window_safe:
            log.info("the %s encoder hears whole turns: streamed audio is encoded at commit",
                     encoder.config.kind)  # fmt: skip
            self.stream_window_s = 0.0
        self.stream_prefill = stream_prefill
        self._sessions: dict[str, Session] = {}
        self._encoded = EncodedAudio(ENCODED_AUDIO_BYTES)  # touched on the encoder thread only
        # decoding and encoding audio here run single-threaded: the engine owns the cores
        self._pool = ThreadPoolExecutor(
            1, thread_name_prefix="speechchat-encode", initializer=single_threaded
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._audio_seconds = 0.0
        self._eos = frozenset(speech_llm.llm.eos_token_ids)

    async def start(self) -> None:
        """Start the engine thread (it fuses, packs or compiles first); call inside the running
        loop."""
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.engine.start)

    async def stop(self) -> None:
        """Cancel every request and join the engine thread."""
        for session in self._sessions.values():
            if session.prefill is not None:
                session.prefill.cancel()
        await asyncio.to_thread(self.engine.stop)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- sessions --------------------------------------------------------------------------

    def open_session(self, system_prompt: str | None = None) -> str:
        if len(self._sessions) >= self.max_sessions:
            raise WorkerBusyError(f"the worker holds its maximum of {self.max_sessions} sessions")
        prompt = (
            system_prompt if system_prompt is not None else self.speech_llm.prompt.system_prompt
        )
        session = new_session(prompt, self.stream_window_s)
        self._sessions[session.session_id] = session
        return session.session_id

    def close_session(self, session_id: str) -> None:
        session = self._session(session_id)
        del self._sessions[session_id]
        session.closed = True
        for request_id in (session.active_request, session.prefill_request):
            if request_id is not None:
                self.engine.cancel(request_id)
        key = session.store_key
        self.engine.call(lambda: self.store.free(key))  # after the cancel has kept it

    def has_session(self, session_id: str) -> bool:
        return session_id in self._sessions

    def history(self, session_id: str) -> list[TurnInfo]:
        return self._session(session_id).info()

    async def append_messages(self, session_id: str, messages: list[dict]) -> None:
        """Parse, decode and encode off the loop, then append (nothing on any error)."""
        session = self._session(session_id)
        turns = await self._off_loop(self._prepare_turns, messages, False)
        if session.closed:
            raise UnknownSessionError(session_id)
        session.turns.extend(turns)
        self._count_audio(turns)

    def _session(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None:
            raise UnknownSessionError(session_id)
        return session

    # -- generation ------------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Event]:
        """TextDelta*, Usage, Finished (or ErrorEvent, Finished("error")); server/protocol.py."""
        events: asyncio.Queue[Event] = asyncio.Queue()
        req = await self._build_request(request, events)
        session = self._sessions.get(request.session_id or "")
        self.engine.submit(req)
        finished = False
        try:
            while not finished:
                event = await events.get()
                finished = isinstance(event, Finished)
                yield event
        finally:
            if not finished:  # the consumer left: client gone or barge-in
                self.engine.cancel(request.request_id)
            if session is not None and session.active_request == request.request_id:
                session.active_request = None

    def cancel(self, request_id: str) -> None:
        self.engine.cancel(request_id)

    async def _build_request(
        self, request: GenerateRequest, events: asyncio.Queue[Event]
    ) -> EngineRequest:
        if (request.session_id is None) == (request.messages is None):
            raise MessageFormatError("a request names either a session_id or messages")
        on_done, session_key = None, None
        if request.session_id is not None:
            session = self._session(request.session_id)
            if session.active_request is not None:
                raise WorkerBusyError(
                    f"session {session.session_id} is answering {session.active_request}"
                )
            turns = list(session.turns)
            session.active_request = request.request_id  # no new prefill of streamed audio
            try:
                while session.prefill is not None and not session.prefill.done():
                    await asyncio.shield(session.prefill)  # its KV is this prompt's prefix
                plan = await self._off_loop(self._plan, turns)
            except BaseException:
                session.active_request = None
                raise
            on_done, session_key = self._reply_callback(session), session.store_key
        else:
            turns = await self._off_loop(self._prepare_turns, request.messages, True)
            plan = await self._off_loop(self._plan, turns)
            self._count_audio(turns)
        return self._engine_request(
            request.request_id, request.params, plan, events, session_key=session_key,
            on_done=on_done,
        )  # fmt: skip

    def _engine_request(
        self, request_id: str, params: SamplingParams, plan: PromptPlan,
        events: asyncio.Queue[Event], **kwargs: Any,
    ) -> EngineRequest:  # fmt: skip
        """A request whose events the engine thread puts on `events` through the loop."""
        loop = self._running_loop()
        return EngineRequest(
            request_id=request_id,
            params=params,
            plan=plan,
            tokenizer=self.speech_llm.llm.tokenizer,
            eos_ids=self._eos,
            emit=lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
            **kwargs,
        )

    def _reply_callback(self, session: Session) -> Callable[[str, FinishReason], None]:
        loop = self._running_loop()

        def on_done(text: str, reason: FinishReason) -> None:  # engine thread
            loop.call_soon_threadsafe(self._append_reply, session, text)

        return on_done

    @staticmethod
    def _append_reply(session: Session, text: str) -> None:
        if not session.closed:
            session.append_reply(text)

    def _plan(self, turns: Sequence[Turn]) -> PromptPlan:
        return plan_prompt(self.speech_llm.llm.tokenizer, turns)

    def _prepare_turns(self, messages: Sequence[Any], stateless: bool) -> list[Turn]:
        """Encoder thread: messages -> turns whose audio parts carry embeddings only."""
        if stateless:
            turns = self.speech_llm.parse(messages)
        else:
            turns = parse_messages(messages, max_seconds=self.speech_llm.prompt.max_audio_seconds)
        return [self._encode_turn(t) for t in turns]

    def _encode_turn(self, turn: Turn) -> Turn:
        if not turn.has_audio:
            return turn
        parts = tuple(
            p.with_embeddings(self._encode_part(p))
            if isinstance(p, AudioPart) and p.embeddings is None
            else p
            for p in turn.parts
        )
        return Turn(turn.role, parts)

    def _encode_part(self, part: AudioPart) -> torch.Tensor:
        """Encoder thread: an audio part's embeddings [T, D], from `_encoded` when this audio
        was heard before."""
        emb = self._encoded.get(part.digest)
        if emb is None:
            emb = self.speech_llm.encode_audio(part)
            self._encoded.put(part.digest, emb)
        return emb

    # -- figures ---------------------------------------------------------------------------

    def stats(self) -> WorkerStats:
        return WorkerStats(
            active_sessions=len(self._sessions),
            running_requests=self.engine.active_count,
            kv_cache_bytes=self.store.used_bytes,
            kv_budget_bytes=self.store.budget_bytes,
            audio_seconds_total=self._audio_seconds,
        )

    def _count_audio(self, turns: Sequence[Turn]) -> None:
        self._audio_seconds += sum(
            p.duration for t in turns for p in t.parts if isinstance(p, AudioPart)
        )

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("Worker.start() must be awaited before use")
        return self._loop

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._running_loop().run_in_executor(self._pool, fn, *args)
