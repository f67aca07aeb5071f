"""Models, health, readiness, Prometheus metrics, the OpenAPI schema, settings and the CLI."""

from __future__ import annotations

import argparse

import httpx
import openai
import pytest

from server.cli import add_serve_arguments, settings_from_args
from server.settings import Settings
from tests.e2e.conftest import serve
from tests.unit.server.conftest import make_app


def test_models_list_names_the_served_model(live):
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
    models = client.models.list().data
    assert len(models) == 1
    name = live.app.state.served_model.name
    assert models[0].id == name and models[0].object == "model"
    assert client.models.retrieve(name).id == name


def test_health_and_readiness(live):
    assert httpx.get(f"{live.url}/healthz").json() == {"status": "ok", "model": None, "audio": None}
    ready = httpx.get(f"{live.url}/readyz")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready" and ready.json()["audio"] is True


def test_metrics_count_requests_and_time_generation(live):
    body = {"model": "any", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    assert httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=60).status_code == 200
    httpx.post(f"{live.url}/v1/chat/completions", json={"model": "x"})  # a 422
    text = httpx.get(f"{live.url}/metrics").text
    assert (
        'speechchat_requests_total{method="POST",route="/v1/chat/completions",status="200"}' in text
    )
    assert 'route="/v1/chat/completions",status="422"' in text
    assert 'speechchat_time_to_first_token_seconds_count{route="/v1/chat/completions"}' in text
    assert "speechchat_tokens_per_second_bucket" in text
    for gauge in ("active_sessions", "kv_cache_bytes", "kv_budget_bytes", "audio_seconds_total"):
        assert f"speechchat_{gauge}" in text


def test_openapi_schema_validates(live):
    validator = pytest.importorskip("openapi_spec_validator")
    schema = httpx.get(f"{live.url}/openapi.json").json()
    validator.validate(schema)
    paths = schema["paths"]
    for path in ("/v1/chat/completions", "/v1/sessions", "/v1/sessions/{session_id}/turns"):
        assert path in paths
    turn_body = paths["/v1/sessions/{session_id}/turns"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(turn_body)


def test_settings_read_the_environment(monkeypatch):
    monkeypatch.setenv("SPEECHCHAT_API_KEYS", "k1, k2")
    monkeypatch.setenv("SPEECHCHAT_ENCODER", "none")
    monkeypatch.setenv("SPEECHCHAT_PORT", "9123")
    settings = Settings()
    assert settings.api_keys == ["k1", "k2"]
    assert settings.encoder is None and settings.port == 9123


def test_cli_flags_override_the_environment(monkeypatch):
    monkeypatch.setenv("SPEECHCHAT_PORT", "9123")
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    defaults = settings_from_args(parser.parse_args([]))
    assert (defaults.host, defaults.port, defaults.llm, defaults.encoder) == (
        "127.0.0.1",
        9123,
        "default",
        "default",
    )
    args = parser.parse_args(
        ["--port", "8001", "--cors-origins", "http://a,http://b", "--stream-window-s", "1.5"]
    )
    settings = settings_from_args(args)
    assert settings.port == 8001 and settings.cors_origins == ["http://a", "http://b"]
    assert settings.stream_window_s == 1.5 and settings.stream_prefill


def test_the_app_gives_its_worker_the_streaming_settings(tiny_llm):
    for server in serve(make_app(tiny_llm, stream_window_s=2.0, stream_prefill=False)):
        worker = server.app.state.worker
        assert (worker.stream_window_s, worker.stream_prefill) == (2.0, False)


def test_cli_rejects_bad_values():
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    with pytest.raises(ValueError):
        settings_from_args(parser.parse_args(["--port", "99999"]))


@pytest.mark.parametrize("shipped", [True, False])
def test_unusable_default_encoder_serves_text_only(
    tiny_llm_dir, caplog, tmp_path, monkeypatch, shipped
):
    """The default encoder fits only the default LLM; missing or mismatched, serve text."""
    import model.checkpoint
    from model.errors import CheckpointFormatError
    from server.app import build_speech_llm

    if not shipped:
        monkeypatch.setattr(model.checkpoint, "SHIPPED_DIR", tmp_path / "none")
    with caplog.at_level("WARNING", logger="server.app"):
        speech_llm = build_speech_llm(Settings(llm=str(tiny_llm_dir), encoder="default"))
    assert speech_llm.encoder is None
    assert "text only" in caplog.text
    with pytest.raises(CheckpointFormatError):  # an explicit path that is wrong still fails
        build_speech_llm(Settings(llm=str(tiny_llm_dir), encoder=str(tmp_path)))
