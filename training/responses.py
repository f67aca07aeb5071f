"""Response generation: the frozen LLM answers every transcript as a typed prompt.

This turns unpaired ASR data (audio, transcript) into (audio, response) pairs, the targets of
modal-invariance alignment. Answers are greedy and capped in length; they are cached by the hash
of (LLM, prompt settings, text), so a rerun or a second manifest with the same sentences is free.

Two engines give the same answers: the server's worker (default: continuous batching, no padding,
the chat template's shared prefix cached) and transformers' `generate` on left-padded batches.
SmolLM2 on 2 cores (`bench/bench_respond.py`, 128-192 texts, up to 36 tokens, three runs): the
worker answers 1.5-1.6x as many texts a second as `generate` on batches of 32 with 32 in flight,
1.65-2.0x with 64; every answer identical.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from model.decoding import SamplingParams
from model.llm import LoadedLLM, load_llm
from model.messages import TextPart, Turn
from model.prompt import render_prompt, text_only_ids, with_system_prompt
from model.speech_llm import SpeechLLM
from server.threads import on_own_thread, single_threaded
from training.manifest import read_manifest, write_manifest

log = logging.getLogger(__name__)

MAX_RESPONSE_TOKENS = 96  # tokens; the paper trains on whole answers, we cap for speed
BATCH_SIZE = 32  # prompts per generate call, or in flight in the worker
ENGINES = ("worker", "generate")
CACHE_NAME = "responses.cache.jsonl"
COMPLETE_KEY = "response_complete"  # manifest key: False when the answer was cut at the cap


def prompt_ids(llm: LoadedLLM, text: str, system_prompt: str | None) -> list[int]:
    """The chat-template ids of `text` as a single user turn (plus an optional system turn)."""
    turns = with_system_prompt([Turn("user", (TextPart(text),))], system_prompt)
    ids = text_only_ids(render_prompt(llm.tokenizer, turns))
    assert ids is not None  # text only
    return ids


@dataclass(frozen=True)
class Answer:
    text: str
    complete: bool  # the LLM ended its turn (False: cut at the token cap)


@torch.inference_mode()
def generate_batch(
    llm: LoadedLLM, prompts: Sequence[list[int]], max_new_tokens: int
) -> list[Answer]:
    """Greedy answers to a batch of prompts (left-padded, so every row ends at the same place)."""
    pad = llm.eos_token_ids[0]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)  # [B, T]
    mask = torch.zeros_like(ids)  # [B, T]
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    out = llm.model.generate(
        ids.to(llm.device),
        attention_mask=mask.to(llm.device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=llm.eos_token_ids,
        pad_token_id=pad,
    )  # [B, T + N]
    eos = set(llm.eos_token_ids)
    return [
        Answer(llm.tokenizer.decode(row, skip_special_tokens=True).strip(), bool(eos & set(row)))
        for row in out[:, width:].tolist()
    ]


def cache_key(llm: LoadedLLM, text: str, system_prompt: str | None, max_new_tokens: int) -> str:
    blob = json.dumps([llm.identity.embed_hash, system_prompt, max_new_tokens, text])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def read_cache(path: Path) -> dict[str, Answer]:
    if not path.is_file():
        return {}
    lines = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {line["key"]: Answer(line["response"], line.get("complete", True)) for line in lines}


def answer_texts(
    llm: LoadedLLM,
    texts: Sequence[str],
    cache_path: Path,
    system_prompt: str | None = None,
    max_new_tokens: int = MAX_RESPONSE_TOKENS,
    batch_size: int = BATCH_SIZE,
    engine: str = "worker",
) -> dict[str, Answer]:
    """text -> the LLM's greedy answer, for every distinct text; resumable through `cache_path`."""
    cache = read_cache(cache_path)
    keys = {t: cache_key(llm, t, system_prompt, max_new_tokens) for t in dict.fromkeys(texts)}
    todo = sorted(
        (t for t, k in keys.items() if k not in cache), key=len
    )  # similar lengths batch well
    log.info("%d distinct texts, %d already answered", len(keys), len(keys) - len(todo))
    with cache_path.open("a") as sink, tqdm(total=len(todo), desc="responses", unit="utt") as bar:

        def record(text: str, answer: Answer) -> None:
            cache[keys[text]] = answer
            line = {"key": keys[text], "response": answer.text, "complete": answer.complete}
            sink.write(json.dumps(line) + "\n")
            sink.flush()
            bar.update(1)

        if engine == "worker":
            answer_with_worker(llm, todo, system_prompt, max_new_tokens, batch_size, record)
        else:
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                prompts = [prompt_ids(llm, t, system_prompt) for t in batch]
                answers = generate_batch(llm, prompts, max_new_tokens)
                for text, answer in zip(batch, answers, strict=True):
                    record(text, answer)
    return {t: cache[k] for t, k in keys.items()}


def answer_with_worker(
    llm: LoadedLLM,
    texts: Sequence[str],
    system_prompt: str | None,
    max_new_tokens: int,
    in_flight: int,
    record: Callable[[str, Answer], None],
) -> None:
    """Greedy answers through the server's worker, `in_flight` requests at a time; each answer
    goes to `record` as it finishes. Models must be loaded off this thread (`on_own_thread`):
    the worker's engine thread should be the only one with a multi-threaded torch pool."""
    # here, not at the top: manifests and data loaders import this module, not the engine
    from server.protocol import ErrorEvent, Finished, GenerateRequest, TextDelta
    from server.worker import Worker

    async def run() -> None:
        worker = Worker(SpeechLLM(llm), max_batch=in_flight, max_sessions=in_flight)
        await worker.start()
        slots = asyncio.Semaphore(in_flight)

        async def answer(text: str) -> None:
            messages = [{"role": "user", "content": text}]
            if system_prompt is not None:
                messages.insert(0, {"role": "system", "content": system_prompt})
            request = GenerateRequest(
                uuid.uuid4().hex, SamplingParams(max_new_tokens=max_new_tokens), messages=messages
            )
            parts, reason = [], None
            async with slots:
                async for event in worker.generate(request):
                    if isinstance(event, TextDelta):
                        parts.append(event.text)
                    elif isinstance(event, ErrorEvent):
                        raise RuntimeError(f"the worker failed on {text!r}: {event.message}")
                    elif isinstance(event, Finished):
                        reason = event.reason
            record(text, Answer("".join(parts).strip(), reason == "stop"))

        try:
            await asyncio.gather(*(answer(t) for t in texts))
        finally:
            await worker.stop()

    threads = torch.get_num_threads()
    single_threaded()  # this thread only waits; torch's threads are the engine thread's
    try:
        asyncio.run(run())
    finally:
        torch.set_num_threads(threads)


def respond_manifest(
    manifest: str | Path,
    out: str | Path | None = None,
    llm: str = "default",
    device: str = "cpu",
    system_prompt: str | None = None,
    max_new_tokens: int = MAX_RESPONSE_TOKENS,
    batch_size: int = BATCH_SIZE,
    engine: str = "worker",
    dtype: str | None = None,
) -> Path:
    """Add `"response"` to every line of a manifest (in place unless `out` is given). `dtype`:
    the LLM's (default: bf16 on CUDA, float32 on CPU; model/llm.py)."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    manifest, out = Path(manifest), Path(out or manifest)
    utterances = read_manifest(manifest)
    loaded = on_own_thread(load_llm, llm, device, dtype)  # its torch pool ends with the thread
    cache_path = out.parent / CACHE_NAME
    texts = [u.text for u in utterances]
    answers = answer_texts(
        loaded, texts, cache_path, system_prompt, max_new_tokens, batch_size, engine
    )
    for utt in utterances:
        utt.response = answers[utt.text].text
        utt.extra[COMPLETE_KEY] = answers[utt.text].complete
    write_manifest(out, utterances)
    log.info("wrote %d responses into %s", len(utterances), out)
    return out
