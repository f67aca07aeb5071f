"""Every client mistake gets a 4xx in OpenAI's error shape, and the server keeps serving."""

from __future__ import annotations

import base64

import httpx
import openai
import pytest

from model.audio import encode_wav
from tests.unit.server.conftest import audio_message, wav_b64

GOOD = {"model": "any", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def post_chat(server, body=None, **kwargs) -> httpx.Response:
    url = f"{server.url}/v1/chat/completions"
    return httpx.post(url, json=body, timeout=60, **kwargs)


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    if code is not None:
        assert error["code"] == code
    return error


def assert_still_serving(server) -> None:
    response = post_chat(server, GOOD)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["role"] == "assistant"


def with_audio(data: str, fmt: str | None = "wav") -> dict:
    audio = {"data": data} if fmt is None else {"data": data, "format": fmt}
    content = [{"type": "input_audio", "input_audio": audio}]
    return {**GOOD, "messages": [{"role": "user", "content": content}]}


CASES = {
    "invalid_json": (
        dict(content=b"{not json", headers={"content-type": "application/json"}),
        400,
        "invalid_json",
    ),
    "invalid_base64": (dict(json=with_audio("@@@not base64@@@")), 400, "invalid_messages"),
    "garbage_audio": (
        dict(json=with_audio(base64.b64encode(b"RIFF....nonsense" * 8).decode())),
        400,
        "invalid_audio",
    ),
    "unsupported_format": (
        dict(json=with_audio(base64.b64encode(b"abc").decode(), "aac")),
        415,
        "unsupported_audio_format",
    ),
    "bad_temperature": (dict(json={**GOOD, "temperature": 5}), 422, "invalid_value"),
    "two_choices": (dict(json={**GOOD, "n": 2}), 422, "invalid_value"),
    "empty_messages": (dict(json={**GOOD, "messages": []}), 422, "invalid_value"),
    "unknown_role": (
        dict(json={**GOOD, "messages": [{"role": "robot", "content": "x"}]}),
        422,
        None,
    ),
    "image_part": (
        dict(
            json={
                **GOOD,
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
                ],
            }
        ),
        422,
        None,
    ),
    "too_many_tokens": (dict(json={**GOOD, "max_tokens": 100000}), 422, "invalid_value"),
    "audio_in_assistant_turn": (
        dict(
            json={
                **GOOD,
                "messages": [
                    {
                        "role": "assistant",
                        "content": [
                            {
                                "type": "input_audio",
                                "input_audio": {"data": "AAAA", "format": "pcm16"},
                            }
                        ],
                    },
                    {"role": "user", "content": "x"},
                ],
            }
        ),
        400,
        None,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_client_mistakes_are_4xx_and_harmless(live, case):
    kwargs, status, code = CASES[case]
    url = f"{live.url}/v1/chat/completions"
    assert_error(httpx.post(url, timeout=60, **kwargs), status, code)
    assert_still_serving(live)


def test_audio_longer_than_the_limit_is_413(live):
    import torch

    long = torch.zeros(16000 * 25)  # 25 s; the test server allows 20 s
    error = assert_error(post_chat(live, with_audio(wav_b64(long))), 413, "audio_too_long")
    assert "limit" in error["message"]
    assert_still_serving(live)


def test_body_larger_than_the_limit_is_413(live):
    big = base64.b64encode(encode_wav(__import__("torch").zeros(16000 * 70))).decode()  # > 2 MiB
    assert_error(post_chat(live, with_audio(big)), 413, "request_too_large")
    assert_still_serving(live)


def test_chunked_body_over_the_limit_is_413(live):
    def chunks():
        yield b'{"model": "any", "messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"}]}'

    response = httpx.post(
        f"{live.url}/v1/chat/completions",
        content=chunks(),
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert_error(response, 413, "request_too_large")
    assert_still_serving(live)


def test_unknown_route_and_method_use_the_error_shape(live):
    assert_error(httpx.get(f"{live.url}/v1/nothing-here"), 404)
    assert_error(httpx.get(f"{live.url}/v1/chat/completions"), 405)


def test_unknown_model_id_is_404(live):
    assert_error(httpx.get(f"{live.url}/v1/models/not-a-model"), 404, "model_not_found")


def test_api_keys_guard_every_v1_route(keyed):
    url = f"{keyed.url}/v1/chat/completions"
    assert_error(httpx.post(url, json=GOOD), 401, "invalid_api_key")
    bad = {"Authorization": "Bearer sk-wrong"}
    assert_error(httpx.post(url, json=GOOD, headers=bad), 401, "invalid_api_key")
    assert_error(httpx.get(f"{keyed.url}/v1/models"), 401)
    assert_error(httpx.post(f"{keyed.url}/v1/sessions", json={}), 401)
    good = {"Authorization": "Bearer sk-test"}
    assert httpx.post(url, json=GOOD, headers=good, timeout=60).status_code == 200
    assert httpx.get(f"{keyed.url}/healthz").status_code == 200  # probes stay open


def test_openai_client_raises_typed_errors(keyed):
    client = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="any", messages=GOOD["messages"])
    client = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="sk-test", max_retries=0)
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="any", messages=GOOD["messages"], temperature=3)
    assert client.chat.completions.create(model="any", messages=GOOD["messages"], max_tokens=1)


def test_text_only_server_refuses_audio_clearly(text_only, tone):
    error = assert_error(post_chat(text_only, {**GOOD, "messages": [audio_message(tone)]}), 422)
    assert error["code"] == "audio_not_supported"
    assert "no audio encoder" in error["message"]
    models = httpx.get(f"{text_only.url}/v1/models").json()
    assert models["data"][0]["input_modalities"] == ["text"]
    assert_still_serving(text_only)
