"""The embedded default stack (SmolLM2-135M-Instruct from its GGUF) through the one-shot API."""

from __future__ import annotations

import pytest
import torch

from model.decoding import SamplingParams
from model.speech_llm import SpeechLLM

pytestmark = pytest.mark.slow

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Give me three tips for sleeping well."},
        {"role": "assistant", "content": "Keep a schedule, avoid screens, and exercise."},
        {"role": "user", "content": "Explain the second one."},
    ],
]


@pytest.fixture(scope="module")
def speech_llm(smol_llm) -> SpeechLLM:
    return SpeechLLM(smol_llm)


def test_default_llm_knows_the_capital_of_france(speech_llm):
    answer = speech_llm.respond_text(PROMPTS[0], max_new_tokens=32)
    assert "Paris" in answer


@pytest.mark.parametrize("messages", PROMPTS)
def test_greedy_respond_equals_generate(speech_llm, messages):
    llm = speech_llm.llm
    ids = llm.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt"
    )["input_ids"]
    out = llm.model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=48,
        do_sample=False,
        eos_token_id=llm.eos_token_ids,
    )
    expected = [t for t in out[0, ids.shape[1] :].tolist() if t not in llm.eos_token_ids]
    ours = list(speech_llm.respond_ids(messages, SamplingParams(max_new_tokens=48)))
    assert ours == expected


def test_score_prefers_the_right_answer(speech_llm):
    right = speech_llm.score(PROMPTS[0], "The capital of France is Paris.")
    wrong = speech_llm.score(PROMPTS[0], "The capital of France is Berlin.")
    assert right.perplexity < wrong.perplexity
    assert right.logprobs[-1] > -1.0  # the end-of-turn id follows a complete answer
