"""REST sessions' lifecycle on the API side: creation time, last use, and idle expiry.

The worker holds each session's history and cache; this registry only remembers when a REST
session was last used, so sessions that clients forget are closed after the idle timeout.
WebSocket sessions are not listed here: they close with their socket.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from server.protocol import UnknownSessionError

if TYPE_CHECKING:
    from server.worker import Worker

log = logging.getLogger(__name__)

MAX_SWEEP_INTERVAL = 30.0  # s, longest pause between two idle sweeps


@dataclass
class SessionRecord:
    created: int  # unix seconds
    system_prompt: str | None
    last_used: float  # monotonic seconds


class SessionRegistry:
    """Which REST sessions exist and when each was last touched."""

    def __init__(self, worker: Worker, idle_timeout: float) -> None:
        self.worker = worker
        self.idle_timeout = idle_timeout
        self.records: dict[str, SessionRecord] = {}

    def open(self, system_prompt: str | None) -> tuple[str, SessionRecord]:
        session_id = self.worker.open_session(system_prompt)
        record = SessionRecord(int(time.time()), system_prompt, time.monotonic())
        self.records[session_id] = record
        return session_id, record

    def touch(self, session_id: str) -> SessionRecord:
        """Mark a session used now; `UnknownSessionError` if it is not a live REST session."""
        record = self.records.get(session_id)
        if record is None or not self.worker.has_session(session_id):
            self.records.pop(session_id, None)
            raise UnknownSessionError(
                f"no session {session_id!r} (never created, deleted or expired)"
            )
        record.last_used = time.monotonic()
        return record

    def close(self, session_id: str) -> None:
        self.touch(session_id)
        del self.records[session_id]
        self.worker.close_session(session_id)

    def expire_idle(self, now: float | None = None) -> list[str]:
        """Close every session unused for longer than the idle timeout; return their ids."""
        now = time.monotonic() if now is None else now
        expired = [sid for sid, r in self.records.items() if now - r.last_used > self.idle_timeout]
        for session_id in expired:
            del self.records[session_id]
            try:
                self.worker.close_session(session_id)
            except UnknownSessionError:
                pass  # the worker dropped it already
        if expired:
            log.info("closed %d idle session(s)", len(expired))
        return expired

    async def sweep_forever(self) -> None:
        interval = min(MAX_SWEEP_INTERVAL, self.idle_timeout / 4)
        while True:
            await asyncio.sleep(interval)
            self.expire_idle()
