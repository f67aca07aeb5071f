"""Real uvicorn on loopback (`LiveServer`, a thread on a free port) and Realtime test helpers."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torchaudio.functional as AF
import uvicorn
from fastapi import FastAPI

from model.audio import pcm16_bytes

CHUNK_MS = 20  # ms per input_audio_buffer.append, as a microphone sends
EVENT_TIMEOUT = 30.0  # s
START_TIMEOUT = 120.0  # s, loading the embedded model included
POLL = 0.02  # s


class LiveServer:
    """One app served by uvicorn on 127.0.0.1; `url` is `http://127.0.0.1:<port>`."""

    def __init__(self, app: FastAPI, ws_max_size: int = 16 << 20) -> None:
        self.app = app
        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, log_level="warning", ws_max_size=ws_max_size
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.started_in = 0.0  # s from start() to accepting connections

    def start(self) -> LiveServer:
        begin = time.perf_counter()
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn exited during startup (see the log above)")
            if time.perf_counter() - begin > START_TIMEOUT:
                raise TimeoutError("uvicorn did not start in time")
            time.sleep(POLL)
        self.started_in = time.perf_counter() - begin
        return self

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def serve(app: FastAPI) -> Iterator[LiveServer]:
    """Start `app`, yield its server, stop it afterwards (use from fixtures)."""
    server = LiveServer(app).start()
    try:
        yield server
    finally:
        server.stop()


def pcm_chunks(waveform: torch.Tensor, rate: int = 24000, silence_s: float = 1.0) -> list[str]:
    """A 16 kHz waveform [T] followed by silence -> base64 pcm16 chunks of 20 ms at `rate`."""
    audio = torch.cat([torch.zeros(8000), waveform, torch.zeros(int(16000 * silence_s))])  # [T]
    if rate != 16000:
        audio = AF.resample(audio, 16000, rate)  # [T']
    raw = pcm16_bytes(audio)
    step = rate * CHUNK_MS // 1000 * 2
    return [base64.b64encode(raw[i : i + step]).decode() for i in range(0, len(raw), step)]


def as_dict(event: Any) -> dict[str, Any]:
    return event if isinstance(event, dict) else event.model_dump(warnings=False)


async def collect_until(recv, kind: str, limit: int = 10000) -> list[dict[str, Any]]:
    """Events (as dicts) up to and including the first of type `kind`."""
    seen = []
    for _ in range(limit):
        found = as_dict(await asyncio.wait_for(recv(), EVENT_TIMEOUT))
        seen.append(found)
        if found["type"] == kind:
            return seen
    raise AssertionError(f"no {kind} in {len(seen)} events")


def raw_recv(socket):
    async def recv() -> dict[str, Any]:
        return json.loads(await asyncio.wait_for(socket.recv(), EVENT_TIMEOUT))

    return recv


def types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


@pytest.fixture(scope="session")
def smol_server(smol_llm, tmp_path_factory) -> Iterator[LiveServer]:
    """SmolLM2 with a tiny random conformer (the shipped encoder may not exist yet)."""
    from model.config import encoder_preset
    from model.encoders import build_encoder
    from model.speech_llm import SpeechLLM
    from server.app import create_app
    from server.settings import Settings

    torch.manual_seed(0)
    encoder = build_encoder(encoder_preset("tiny", llm_hidden=smol_llm.hidden_size))
    app = create_app(Settings(encoder=None), SpeechLLM(smol_llm, encoder))
    yield from serve(app)
