"""The one-shot API: a frozen LLM with ears. `respond()` streams an answer, `score()` rates one.

Dims: T prompt positions, N response tokens, D LLM width, V vocabulary.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from model.checkpoint import load_encoder_spec
from model.config import PromptConfig
from model.decoding import SamplingParams, StopStreamer, select_tokens
from model.encoders.base import AudioEncoder
from model.errors import MessageFormatError
from model.llm import LoadedLLM, load_llm
from model.messages import AudioPart, Turn, parse_messages
from model.prompt import (
    Segment,
    embed_segments,
    render_prompt,
    response_ids,
    with_system_prompt,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scored:
    """Per-token log-probabilities of a response under a prompt."""

    token_ids: list[int]
    logprobs: torch.Tensor  # [N]

    @property
    def perplexity(self) -> float:
        return float(torch.exp(-self.logprobs.mean()))


class SpeechLLM:
    """A frozen chat LLM plus an audio encoder whose output sits where a turn's text would."""

    def __init__(
        self,
        llm: LoadedLLM,
        encoder: AudioEncoder | None = None,
        prompt: PromptConfig | None = None,
    ) -> None:
        self.llm = llm
        self.encoder = encoder.to(llm.device).eval() if encoder is not None else None
        self.prompt = prompt or PromptConfig()

    @classmethod
    def from_specs(
        cls,
        llm: str = "default",
        encoder: str | None = "default",
        device: str = "cpu",
        dtype: str | None = None,
    ) -> SpeechLLM:
        """Load an LLM spec and (optionally) an encoder checkpoint aligned to it."""
        loaded = load_llm(llm, device=device, dtype=dtype)
        if encoder is None:
            return cls(loaded)
        enc, prompt = load_encoder_spec(encoder, loaded)
        return cls(loaded, enc, prompt)

    # -- prompts ---------------------------------------------------------------------------

    def parse(self, messages: Sequence[Any]) -> list[Turn]:
        turns = parse_messages(messages, max_seconds=self.prompt.max_audio_seconds)
        return with_system_prompt(turns, self.prompt.system_prompt)

    def encode_audio(self, part: AudioPart) -> torch.Tensor:
        """An audio part -> its embeddings [T_audio, D] (reused when already computed)."""
        if part.embeddings is not None:
            return part.embeddings.to(self.llm.device, self.llm.dtype)  # [T_audio, D]
        if self.encoder is None:
            raise MessageFormatError("this model has no audio encoder loaded; send text only")
        return self.encoder.encode_one(part.waveform)  # [T_audio, D]

    def segments(self, turns: Sequence[Turn], add_generation_prompt: bool = True) -> list[Segment]:
        return render_prompt(self.llm.tokenizer, turns, add_generation_prompt)

    def embed(self, turns: Sequence[Turn], add_generation_prompt: bool = True) -> torch.Tensor:
        """Turns -> prompt embeddings [T, D]."""
        segments = self.segments(turns, add_generation_prompt)
        return embed_segments(segments, self.llm.embed_tokens, self.encode_audio)  # [T, D]

    # -- generation ------------------------------------------------------------------------

    @torch.inference_mode()
    def respond_ids(self, messages: Sequence[Any], params: SamplingParams) -> Iterator[int]:
        """Stream the answer's token ids (the end-of-turn id is not yielded)."""
        embeds = self.embed(self.parse(messages))[None]  # [1, T, D]
        cache = DynamicCache(config=self.llm.model.config)
        generator = params.make_generator(self.llm.device)
        eos = set(self.llm.eos_token_ids)
        out = self.llm.model(inputs_embeds=embeds, cache=cache, use_cache=True, logits_to_keep=1)
        for _ in range(params.max_new_tokens):
            token = select_tokens(out.logits[:, -1], params, generator)  # [1]
            if int(token) in eos:
                return
            yield int(token)
            out = self.llm.model(
                input_ids=token[:, None], cache=cache, use_cache=True, logits_to_keep=1
            )

    def respond(
        self,
        messages: Sequence[Any],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
    ) -> Iterator[str]:
        """Stream the answer as text deltas; greedy at temperature 0."""
        params = SamplingParams(max_new_tokens, temperature, top_p, seed, tuple(stop))
        streamer = StopStreamer(self.llm.tokenizer, params.stop)
        for token in self.respond_ids(messages, params):
            delta = streamer.push(token)
            if delta:
                yield delta
            if streamer.stopped:
                return
        if rest := streamer.flush():
            yield rest

    def respond_text(self, messages: Sequence[Any], **kwargs: Any) -> str:
        """The whole answer at once."""
        return "".join(self.respond(messages, **kwargs))

    # -- scoring ---------------------------------------------------------------------------

    @torch.inference_mode()
    def score(self, messages: Sequence[Any], response_text: str, complete: bool = True) -> Scored:
        """Log-probs [N] of `response_text` as the assistant's reply, plus its end-of-turn id
        when `complete` (False for an answer cut at a length cap)."""
        prompt = self.embed(self.parse(messages))  # [T, D]
        eos = self.llm.eos_token_ids[0]
        ids = response_ids(self.llm.tokenizer, response_text, eos)[: None if complete else -1]
        target = torch.tensor(ids, device=self.llm.device)  # [N]
        embeds = torch.cat([prompt, self.llm.embed_tokens(target)])[None]  # [1, T + N, D]
        logits = self.llm.model(inputs_embeds=embeds).logits[0]  # [T + N, V]
        pred = logits[prompt.shape[0] - 1 : -1].float().log_softmax(-1)  # [N, V]
        return Scored(ids, pred.gather(-1, target[:, None]).squeeze(-1).cpu())  # [N]
