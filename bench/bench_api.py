"""API figures on the embedded default (SmolLM2 + the shipped encoder) behind real uvicorn:
time to first token for a spoken question over REST (cold, then with the prefix cached) and over
the realtime WebSocket (from the end of speech; for an encoder of whole turns also without its
drafts at pauses, server/sessions.py), and single-stream decode tokens/s.

Usage: PYTHONPATH=. python bench/bench_api.py ["spoken question text"]
"""

import asyncio  # noqa: E401
import base64
import statistics
import sys
import time

import openai

from bench.speech import speak
from model.audio import encode_wav
from model.checkpoint import load_encoder_spec
from model.llm import load_llm
from model.speech_llm import SpeechLLM
from server import sessions
from server.app import create_app
from server.settings import Settings
from server.threads import on_own_thread, single_threaded
from tests.e2e.conftest import CHUNK_MS, LiveServer, as_dict, pcm_chunks

text = sys.argv[1] if len(sys.argv) > 1 else "What is the capital of France? Answer in a word."
speech = speak(text)
print(f"spoken question: {speech.shape[0] / 16000:.2f} s")
t0 = time.perf_counter()
# loaded on threads that end, so the engine's is the only OpenMP pool (server/threads.py)
llm = on_own_thread(load_llm, "default")
enc, prompt = on_own_thread(load_encoder_spec, "default", llm)
single_threaded()
server = LiveServer(create_app(Settings(), SpeechLLM(llm, enc, prompt))).start()
print(f"model+app ready in {time.perf_counter() - t0:.2f} s")
client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
wav = base64.b64encode(encode_wav(speech)).decode()
msg = [
    {
        "role": "user",
        "content": [{"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}}],
    }
]


def ttft_rest():
    begin = time.perf_counter()
    for ch in client.chat.completions.create(model="m", messages=msg, max_tokens=8, stream=True):
        if ch.choices and ch.choices[0].delta.content:
            return time.perf_counter() - begin


def tokps():
    stamps = []
    for ch in client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "Write a long story about a dragon."}],
        max_tokens=128,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if ch.choices and ch.choices[0].delta.content:
            stamps.append(time.perf_counter())
        if ch.usage:
            n = ch.usage.completion_tokens
    return (n - 1) / (stamps[-1] - stamps[0]), n


cold = ttft_rest()  # the audio's prefix is not cached yet
rest = [ttft_rest() for _ in range(5)]  # the worker reuses the cached prefix
print(f"REST TTFT, first request: {cold * 1000:.0f} ms")
tps = [tokps() for _ in range(3)]
print(
    f"REST TTFT (same spoken question again, prefix cached): median {statistics.median(rest) * 1000:.0f} ms  all {[round(x * 1000) for x in rest]}"  # noqa: E501
)
print(
    f"decode tokens/s (1 stream, 128 tokens): median {statistics.median(t for t, _ in tps):.1f}  {[(round(t, 1), n) for t, n in tps]}"  # noqa: E501
)

chunks = pcm_chunks(speech, silence_s=1.0)
speech_chunks = (8000 + speech.shape[0]) * 1000 // 16000 // CHUNK_MS


async def ws():
    ac = openai.AsyncOpenAI(
        api_key="x", base_url=f"{server.url}/v1", websocket_base_url=server.ws_url
    )
    out = []
    async with ac.realtime.connect(model="m") as conn:
        await conn.recv()
        await conn.session.update(
            session={
                "type": "realtime",
                "max_output_tokens": 8,
                "audio": {
                    "input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 500}}
                },
            }
        )
        for _ in range(4):

            async def send():
                end = 0.0
                for i, c in enumerate(chunks):
                    await conn.input_audio_buffer.append(audio=c)
                    if i == speech_chunks:
                        end = time.perf_counter()
                    await asyncio.sleep(CHUNK_MS / 1000)
                return end

            task = asyncio.create_task(send())
            stopped = first = None
            while True:
                e = as_dict(await conn.recv())
                if e["type"] == "input_audio_buffer.speech_stopped":
                    stopped = time.perf_counter()
                if e["type"] == "response.output_text.delta" and first is None:
                    first = time.perf_counter()
                if e["type"] == "response.done":
                    break
            end = await task
            out.append((first - end, first - stopped))
    return out


for label, pause in (("", sessions.DRAFT_PAUSE), (", no drafts at pauses", float("inf"))):
    sessions.DRAFT_PAUSE = pause  # read at each push (server/sessions.py); inf: never a pause
    res = asyncio.run(ws())[1:]
    print(
        f"WS TTFT{label} from end of speech (silence_duration_ms=500 included): median {statistics.median(a for a, _ in res) * 1000:.0f} ms; from speech_stopped: median {statistics.median(b for _, b in res) * 1000:.0f} ms  {[(round(a * 1000), round(b * 1000)) for a, b in res]}"  # noqa: E501
    )
server.stop()
