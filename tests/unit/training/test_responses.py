"""`speechchat respond`: the server's worker answers transcripts exactly as `generate` does."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from training.manifest import Utterance, read_manifest, write_manifest
from training.responses import (
    CACHE_NAME,
    COMPLETE_KEY,
    answer_texts,
    generate_batch,
    prompt_ids,
    respond_manifest,
)

TEXTS = [
    "What is the capital of France?",
    "Tell me a joke.",
    "How do airplanes stay in the air, and why do they not fall when the engines stop?",
    "Name three colours.",
    "What is the capital of France?",  # a repeat is answered once
    "Why?",
]


def test_worker_answers_equal_generate_one_prompt_at_a_time(tiny_llm, tmp_path: Path):
    cache = tmp_path / CACHE_NAME
    threads = torch.get_num_threads()
    for system in (None, "Answer in one word."):
        answers = answer_texts(tiny_llm, TEXTS, cache, system, 12, batch_size=4, engine="worker")
        assert list(answers) == list(dict.fromkeys(TEXTS))
        for text, answer in answers.items():
            (expected,) = generate_batch(tiny_llm, [prompt_ids(tiny_llm, text, system)], 12)
            assert answer == expected  # text and completeness: no padding, nothing batched
    assert torch.get_num_threads() == threads  # the caller's torch threads are left as they were
    # each distinct (system prompt, text) answered once; a rerun reads them from the cache
    assert len(cache.read_text().splitlines()) == 2 * 5
    again = answer_texts(tiny_llm, TEXTS, cache, None, 12, batch_size=4, engine="worker")
    assert len(cache.read_text().splitlines()) == 10 and again == answer_texts(
        tiny_llm, TEXTS, cache, None, 12, engine="generate"
    )


def test_embedded_llm_both_engines_write_the_same_manifest(tmp_path: Path):
    lines = [Utterance(f"u{i}", "a.flac", t) for i, t in enumerate(TEXTS)]
    out = {}
    for engine in ("worker", "generate"):
        folder = tmp_path / engine
        folder.mkdir()
        write_manifest(folder / "m.jsonl", lines)
        respond_manifest(folder / "m.jsonl", max_new_tokens=24, batch_size=3, engine=engine)
        out[engine] = [
            (u.response, u.extra[COMPLETE_KEY]) for u in read_manifest(folder / "m.jsonl")
        ]
        cached = [json.loads(line) for line in (folder / CACHE_NAME).read_text().splitlines()]
        assert len(cached) == 5
    assert out["worker"] == out["generate"]
    assert all(response for response, _ in out["worker"])
    assert "Paris" in out["worker"][0][0]
