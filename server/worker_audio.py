"""Streamed audio for the worker: pushes, drafts at pauses, the commit, and prefills as heard.

A mixin of `server.worker.Worker`, split out because it is one idea: audio pushed in chunks is
encoded while the user speaks. A window-safe encoder gets whole windows as they fill; an encoder
of whole turns gets a draft of the turn at each pause (`server.sessions.Draft`). Each encoding is
prefilled into the session's KV cache at once (a prefill-only engine request, one at a time per
session, none while it answers), so the commit prefills only what came after it and the turn's
closing tokens. Runs on the event loop, like the rest of the worker.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from asyncio import Task
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from model.config import SAMPLE_RATE
from model.decoding import SamplingParams
from model.errors import MessageFormatError
from model.messages import AudioPart, Turn
from server.engine_request import PromptPlan, plan_heard
from server.protocol import ErrorEvent, Event, Finished
from server.sessions import (
    AudioStream,
    Draft,
    Session,
    Windows,
    check_commit_length,
    decode_pcm16,
)

if TYPE_CHECKING:
    from model.speech_llm import SpeechLLM
    from server.engine import Engine
    from server.engine_request import EngineRequest

log = logging.getLogger(__name__)
T = TypeVar("T")


class AudioStreaming:
    """`push_audio`, `commit_audio`, `clear_audio` and the prefills of what was heard; the
    attributes and helpers it names are the Worker's."""

    speech_llm: SpeechLLM
    engine: Engine
    stream_window_s: float
    stream_prefill: bool
    _pool: ThreadPoolExecutor

    def _session(self, session_id: str) -> Session:
        raise NotImplementedError

    def _count_audio(self, turns: list[Turn]) -> None:
        raise NotImplementedError

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        raise NotImplementedError

    def _engine_request(self, *args: Any, **kwargs: Any) -> EngineRequest:
        raise NotImplementedError

    async def push_audio(self, session_id: str, pcm16: bytes, sample_rate: int) -> None:
        """Buffer pcm16 audio; whole windows go to the encoder while the user speaks (an encoder
        of whole turns gets a draft of the turn at each pause instead)."""
        session = self._session(session_id)
        wav = await self._off_loop(decode_pcm16, pcm16, sample_rate)  # [T_wav]
        stream, encoder = session.stream, self.speech_llm.encoder
        for window in stream.push(wav):
            if encoder is not None:
                stream.windows.append(self._pool.submit(encoder.encode_one, window))
                seconds = len(stream.windows) * stream.window_seconds
                self._heard(session, stream.key, seconds, list(stream.windows))
        if encoder is not None and stream.wants_draft():  # a pause: draft the whole turn
            end = stream.loud_end
            embeddings = self._pool.submit(encoder.encode_one, stream.speech())
            stream.draft = Draft(f"{stream.key}-{end}", end, embeddings)
            self._heard(session, stream.draft.key, end / SAMPLE_RATE, [embeddings])

    def _heard(self, session: Session, key: str, seconds: float, windows: Windows) -> None:
        """Prefill the history plus these encodings of the stream (when `stream_prefill`)."""
        if self.stream_prefill:
            session.prefill = asyncio.ensure_future(
                self._prefill_heard(session, session.stream, key, seconds, windows, session.prefill)
            )

    async def commit_audio(self, session_id: str) -> float:
        """The buffered audio becomes a user turn; returns its seconds."""
        session = self._session(session_id)
        stream = session.stream
        check_commit_length(stream.samples)
        if self.speech_llm.encoder is None:
            raise MessageFormatError("this model has no audio encoder loaded; send text only")
        session.reset_stream(self.stream_window_s)
        if (draft := stream.usable_draft()) is not None:  # only a pause came after it
            try:
                emb = await self._off_loop(draft.embeddings.result)
            except Exception as err:  # encoded again below, which reports what fails
                log.warning("the draft of a streamed turn failed: %r", err)
            else:
                part = AudioPart(draft.key, stream.samples / SAMPLE_RATE)
                return self._commit_turn(session, part, emb)
        part, rest, windows = stream.whole(), stream.take_rest(), stream.windows
        encoder = self.speech_llm.encoder

        def encode_rest() -> torch.Tensor:
            embs = [w.result() for w in windows]  # done: this pool runs in submission order
            if rest.numel():
                embs.append(encoder.encode_one(rest))  # [T, D]
            return torch.cat(embs)  # [T, D]

        return self._commit_turn(session, part, await self._off_loop(encode_rest))

    def _commit_turn(self, session: Session, part: AudioPart, emb: torch.Tensor) -> float:
        """The committed audio, with its embeddings [T, D], becomes the session's user turn."""
        turn = Turn("user", (part.with_embeddings(emb),))
        if not session.closed:
            session.turns.append(turn)
        self._count_audio([turn])
        return part.duration

    def clear_audio(self, session_id: str) -> None:
        self._session(session_id).reset_stream(self.stream_window_s)

    async def _prefill_heard(
        self,
        session: Session,
        stream: AudioStream,
        key: str,
        seconds: float,
        windows: Windows,
        previous: Task[None] | None,
    ) -> None:
        """Prefill the history plus the stream's encodings (windows, or a draft) into the
        session's cache, as an audio part keyed `key`. Skipped once the stream is committed or
        cleared, or while the session answers."""
        if previous is not None:
            await asyncio.wait([previous])  # one at a time: a prefill holds the session's cache

        sid = session.session_id

        def idle() -> bool:
            return not session.closed and session.stream is stream and not session.active_request

        try:
            if not idle():
                return
            turns = list(session.turns)
            plan = await self._off_loop(self._plan_heard, turns, key, seconds, windows)
            if not idle():  # checked again after the wait, then submitted at once
                return
            events: asyncio.Queue[Event] = asyncio.Queue()
            req = self._engine_request(
                uuid.uuid4().hex, SamplingParams(), plan, events,
                session_key=session.store_key, prefill_only=True,
            )  # fmt: skip
            session.prefill_request = req.request_id
            self.engine.submit(req)
            while not isinstance(event := await events.get(), Finished):
                if isinstance(event, ErrorEvent):
                    log.warning("streamed-audio prefill of %s failed: %s", sid, event.message)
        except Exception as err:  # only a head start: the commit's request prefills the rest
            log.warning("streamed-audio prefill of %s failed: %s", sid, err)
        finally:
            session.prefill_request = None

    def _plan_heard(
        self, turns: list[Turn], key: str, seconds: float, windows: Windows
    ) -> PromptPlan:
        """Encoder thread (after the windows, which it encoded): history + the audio so far."""
        emb = torch.cat([w.result() for w in windows])  # [T, D]
        part = AudioPart(key, seconds, embeddings=emb)
        return plan_heard(self.speech_llm.llm.tokenizer, [*turns, Turn("user", (part,))])
