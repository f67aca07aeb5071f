"""API fixtures: the real worker over a tiny random Llama and conformer, served by uvicorn."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest
import torch

from model.audio import encode_wav
from tests.e2e.conftest import LiveServer, serve


def tiny_speech_llm(tiny_llm, with_encoder: bool = True):
    from model.config import encoder_preset
    from model.encoders import build_encoder
    from model.speech_llm import SpeechLLM

    if not with_encoder:
        return SpeechLLM(tiny_llm)
    torch.manual_seed(0)
    encoder = build_encoder(encoder_preset("tiny", llm_hidden=tiny_llm.hidden_size))
    return SpeechLLM(tiny_llm, encoder)


def make_app(tiny_llm, with_encoder: bool = True, **settings):
    from server.app import create_app
    from server.settings import Settings

    defaults = dict(encoder=None, default_max_tokens=16, max_audio_seconds=20.0)
    return create_app(Settings(**{**defaults, **settings}), tiny_speech_llm(tiny_llm, with_encoder))


@pytest.fixture(scope="session")
def live(tiny_llm) -> Iterator[LiveServer]:
    """The main test server: tiny model with an encoder, no API keys, small limits."""
    yield from serve(make_app(tiny_llm, max_request_bytes=2 << 20))


@pytest.fixture(scope="session")
def keyed(tiny_llm) -> Iterator[LiveServer]:
    """A server that requires the API key `sk-test`."""
    yield from serve(make_app(tiny_llm, api_keys=["sk-test"]))


@pytest.fixture(scope="session")
def text_only(tiny_llm) -> Iterator[LiveServer]:
    """A server with no encoder loaded."""
    yield from serve(make_app(tiny_llm, with_encoder=False))


@pytest.fixture(scope="session")
def tone() -> torch.Tensor:
    """One second of a 220 Hz tone at 16 kHz [T], as a stand-in for speech where content is moot."""
    t = torch.arange(16000) / 16000
    return 0.3 * torch.sin(2 * torch.pi * 220 * t)


def wav_b64(waveform: torch.Tensor) -> str:
    return base64.b64encode(encode_wav(waveform)).decode("ascii")


def audio_message(waveform: torch.Tensor, text: str | None = None) -> dict:
    parts = [{"type": "input_audio", "input_audio": {"data": wav_b64(waveform), "format": "wav"}}]
    if text:
        parts.append({"type": "text", "text": text})
    return {"role": "user", "content": parts}
