"""Stateful sessions over REST: create, text/audio/upload/SSE turns, history, delete."""

from __future__ import annotations

import json

import httpx
import pytest

from model.audio import encode_wav
from server.session_registry import SessionRegistry
from tests.unit.server.conftest import wav_b64


@pytest.fixture
def session(live) -> str:
    response = httpx.post(f"{live.url}/v1/sessions", json={"system_prompt": "Be brief."})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def turn(live, session_id: str, **kwargs) -> httpx.Response:
    return httpx.post(f"{live.url}/v1/sessions/{session_id}/turns", timeout=60, **kwargs)


def history(live, session_id: str) -> list[dict]:
    response = httpx.get(f"{live.url}/v1/sessions/{session_id}")
    assert response.status_code == 200, response.text
    return response.json()["messages"]


def test_session_without_body_is_created(live):
    response = httpx.post(f"{live.url}/v1/sessions")
    assert response.status_code == 201
    body = response.json()
    assert body["object"] == "session" and body["system_prompt"] is None


def test_text_turns_build_a_history(live, session):
    first = turn(live, session, json={"content": "Hello there", "max_tokens": 3})
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["session_id"] == session and body["object"] == "chat.completion"
    second = turn(live, session, json={"text": "And again", "max_tokens": 3})
    assert second.json()["usage"]["prompt_tokens"] > body["usage"]["prompt_tokens"]
    assert second.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    users = [m for m in history(live, session) if m["role"] == "user"]
    assert [m["content"][-1]["text"] for m in users] == ["Hello there", "And again"]
    assistants = [m for m in history(live, session) if m["role"] == "assistant"]
    assert len(assistants) == 2


def test_audio_turn_shows_as_audio_with_duration(live, session, tone):
    audio = {"data": wav_b64(tone), "format": "wav"}
    response = turn(live, session, json={"audio": audio, "text": "what is this", "max_tokens": 2})
    assert response.status_code == 200, response.text
    user = [m for m in history(live, session) if m["role"] == "user"][-1]
    kinds = [part["type"] for part in user["content"]]
    assert "input_audio" in kinds
    seconds = [p["duration_seconds"] for p in user["content"] if p["type"] == "input_audio"]
    assert seconds == [pytest.approx(1.0, abs=0.01)]


def test_multipart_upload_turn(live, session, tone):
    files = {"file": ("question.wav", encode_wav(tone), "audio/wav")}
    response = turn(live, session, files=files, data={"max_tokens": "2", "text": "hi"})
    assert response.status_code == 200, response.text
    user = [m for m in history(live, session) if m["role"] == "user"][-1]
    assert user["content"][0]["type"] == "input_audio"


def test_streamed_turn_is_sse(live, session):
    with httpx.stream(
        "POST",
        f"{live.url}/v1/sessions/{session}/turns",
        json={"content": "Stream please", "max_tokens": 4, "stream": True},
        timeout=60,
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["usage"]["completion_tokens"] >= 1


def test_delete_then_everything_is_404(live, session):
    deleted = httpx.delete(f"{live.url}/v1/sessions/{session}")
    assert deleted.json() == {"id": session, "object": "session.deleted", "deleted": True}
    assert httpx.get(f"{live.url}/v1/sessions/{session}").status_code == 404
    assert turn(live, session, json={"content": "hi"}).status_code == 404
    assert httpx.delete(f"{live.url}/v1/sessions/{session}").status_code == 404


@pytest.mark.parametrize(
    "kwargs,status",
    [
        (dict(content=b"{oops", headers={"content-type": "application/json"}), 400),
        (dict(content=b"hello", headers={"content-type": "text/plain"}), 415),
        (dict(json={"max_tokens": 2}), 422),
        (dict(json={"content": "x", "temperature": -1}), 422),
        (dict(json={"audio": {"data": "!!", "format": "wav"}}), 400),
        (dict(files={"file": ("x.wav", b"not audio at all", "audio/wav")}), 400),
        (dict(files={"file": ("x.aac", b"abc", "audio/aac")}, data={"format": "aac"}), 415),
    ],
)
def test_turn_mistakes_are_4xx_and_the_session_survives(live, session, kwargs, status):
    response = turn(live, session, **kwargs)
    assert response.status_code == status, response.text
    assert response.json()["error"]["message"]
    assert turn(live, session, json={"content": "still there?", "max_tokens": 2}).status_code == 200


def test_unknown_session_is_404(live):
    response = httpx.get(f"{live.url}/v1/sessions/nope")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "session_not_found"


def test_idle_sessions_expire(live):
    registry: SessionRegistry = live.app.state.registry
    session_id = httpx.post(f"{live.url}/v1/sessions").json()["id"]
    fresh = httpx.post(f"{live.url}/v1/sessions").json()["id"]
    record = registry.records[session_id]
    expired = registry.expire_idle(now=record.last_used + registry.idle_timeout + 1)
    assert session_id in expired
    assert httpx.get(f"{live.url}/v1/sessions/{session_id}").status_code == 404
    assert not live.app.state.worker.has_session(session_id)
    httpx.delete(f"{live.url}/v1/sessions/{fresh}")
