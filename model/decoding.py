"""Token selection and incremental detokenization, shared by `respond()` and the server's engine.

Dims: B rows, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

REPLACEMENT_CHAR = "\ufffd"  # what a partial UTF-8 sequence decodes to; hold it back


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen; temperature 0 is greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def make_generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None or self.temperature == 0.0:
            return None
        gen = torch.Generator(device=device)
        gen.manual_seed(self.seed)
        return gen


def select_tokens(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Next-token logits [B, V] -> chosen ids [B] (argmax, or top-p sampling at temperature)."""
    if params.temperature == 0.0:
        return logits.argmax(dim=-1)  # [B]
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)  # [B, V]
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)  # [B, V]
        outside = sorted_p.cumsum(dim=-1) - sorted_p > params.top_p  # [B, V]
        sorted_p = sorted_p.masked_fill(outside, 0.0)  # [B, V]
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)  # [B, V]
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # [B]


class IncrementalDecoder:
    """Turns a growing list of ids into text deltas, never splitting a UTF-8 character."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        """Add one id; return the newly completed text (may be empty)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith(REPLACEMENT_CHAR):
            return ""
        delta, self.emitted = text[len(self.emitted) :], text
        return delta

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)


def find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Index where the earliest stop string begins in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


class StopStreamer:
    """Text deltas of a growing reply, cut at its first stop string; a tail that could still
    grow into a stop string is held back until it cannot."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: tuple[str, ...]) -> None:
        self.decoder = IncrementalDecoder(tokenizer)
        self.stops = stops
        self.hold = max((len(s) - 1 for s in stops), default=0)
        self.sent = 0  # characters of decoded text already handed out
        self.stopped = False  # a stop string ended the reply

    def push(self, token_id: int) -> str:
        """Add one id; return the text now safe to emit (may be empty)."""
        self.decoder.push(token_id)
        text = self.decoder.emitted
        cut = find_stop(text, self.stops)
        if cut is not None:
            delta, self.sent, self.stopped = text[self.sent : cut], len(text), True
            return delta
        end = len(text) - self.hold
        if end <= self.sent:
            return ""
        delta, self.sent = text[self.sent : end], end
        return delta

    def flush(self) -> str:
        """The held-back rest once the reply ends (nothing after a stop string)."""
        if self.stopped:
            return ""
        delta = self.decoder.text[self.sent :]
        self.sent += len(delta)
        return delta

    @property
    def text(self) -> str:
        """The whole reply so far, without the stop string and what follows it."""
        text = self.decoder.text
        cut = find_stop(text, self.stops)
        return text if cut is None else text[:cut]
