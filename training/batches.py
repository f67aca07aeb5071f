"""Batches for alignment and evaluation: audio prompts and text prompts with response targets.

Every example is one user turn (audio, or its transcript as text) answered by the frozen LLM's
own response. The template text around the turn is the same for every example, so it is rendered
once (`PromptFrame`) and each row is [prefix][turn][suffix][response], right-padded.

Dims: B rows, T positions, N response tokens in the batch (all rows), D LLM width, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.utils.data import Dataset

from model.audio import load_audio_file
from model.llm import LoadedLLM
from model.messages import AudioPart, TextPart, Turn
from model.prompt import AudioSpan, render_prompt, response_ids, tokenize, with_system_prompt
from training.manifest import Utterance

if TYPE_CHECKING:
    from training.frame_cache import FrameCache
from training.responses import COMPLETE_KEY

PLACEHOLDER_SECONDS = 0.0  # s, the frame is rendered around an empty audio span


@dataclass(frozen=True)
class PromptFrame:
    """Template ids before and after a single user turn."""

    prefix: list[int]
    suffix: list[int]
    system_prompt: str | None = None

    @classmethod
    def build(cls, llm: LoadedLLM, system_prompt: str | None) -> PromptFrame:
        part = AudioPart(digest="frame", duration=PLACEHOLDER_SECONDS)
        turns = with_system_prompt([Turn("user", (part,))], system_prompt)
        segments = render_prompt(llm.tokenizer, turns)
        spans = [i for i, s in enumerate(segments) if isinstance(s, AudioSpan)]
        before = [i for s in segments[: spans[0]] for i in s]  # type: ignore[union-attr]
        after = [i for s in segments[spans[0] + 1 :] for i in s]  # type: ignore[union-attr]
        return cls(before, after, system_prompt)

    def text_ids(self, llm: LoadedLLM, text: str) -> list[int]:
        """A typed turn's full prompt ids (rendered whole, as `respond()` would)."""
        turns = with_system_prompt([Turn("user", (TextPart(text),))], self.system_prompt)
        return [i for s in render_prompt(llm.tokenizer, turns) for i in s]  # type: ignore[union-attr]

    def turn_ids(self, llm: LoadedLLM, text: str) -> list[int]:
        """The ids a typed turn puts between prefix and suffix."""
        ids = self.text_ids(llm, text)
        n_pre, n_suf = len(self.prefix), len(self.suffix)
        if ids[:n_pre] == self.prefix and ids[len(ids) - n_suf :] == self.suffix:
            return ids[n_pre : len(ids) - n_suf]
        return tokenize(llm.tokenizer, " " + text)  # BPE merged across the frame's edge


@dataclass
class Example:
    id: str
    audio: torch.Tensor  # waveform [T_wav], or cached front frames [T_f, D_f]
    text: str
    response: list[int]  # target ids, end-of-turn included unless truncated


def response_target(llm: LoadedLLM, utt: Utterance) -> list[int]:
    """The response's ids; the end-of-turn id only if the LLM ended its answer there."""
    ids = response_ids(llm.tokenizer, utt.response or "", llm.eos_token_ids[0])
    return ids if utt.extra.get(COMPLETE_KEY, True) else ids[:-1]


class AlignDataset(Dataset):
    """Manifest lines with responses -> examples (audio decoded here, in loader workers; or the
    encoder's cached front frames read instead when `frames` is given)."""

    def __init__(
        self,
        utterances: Sequence[Utterance],
        llm: LoadedLLM,
        max_response_tokens: int,
        max_audio_seconds: float,
        frames: FrameCache | None = None,
    ) -> None:
        missing = [u.id for u in utterances if u.response is None]
        if missing:
            raise ValueError(
                f"{len(missing)} utterances have no response (run `speechchat respond`)"
            )
        self.utterances = list(utterances)
        self.max_seconds = max_audio_seconds
        self.frames = frames
        self.targets = [response_target(llm, u)[:max_response_tokens] for u in self.utterances]

    def __len__(self) -> int:
        return len(self.utterances)

    def __getitem__(self, index: int) -> Example:
        utt = self.utterances[index]
        audio = read_input(utt, self.max_seconds, self.frames)
        return Example(utt.id, audio, utt.text, self.targets[index])


def read_input(utt: Utterance, max_seconds: float, frames: FrameCache | None) -> torch.Tensor:
    """An utterance's encoder input: its cached front frames [T_f, D_f] when `frames` is given,
    else its waveform [T_wav]."""
    if frames is not None:
        return frames.load(utt)
    return load_audio_file(utt.audio, max_seconds=max_seconds)


def encode_batch(encoder, batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A collated batch through the encoder -> (embeddings [B, T, D], lengths [B]); padded
    frames [B, T_f, D_f] (a frame cache's) skip the encoder's frozen front."""
    inputs = batch["waveforms"]
    extra = {"precomputed": True} if inputs.ndim == 3 else {}
    return encoder(inputs.to(device), batch["lengths"].to(device), **extra)


def pad_waveforms(waveforms: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mono waveforms [T_i] (or frames [T_i, D]) -> zero-padded batch [B, T_wav] ([B, T, D]) and
    lengths [B] in samples (frames)."""
    lengths = torch.tensor([w.shape[0] for w in waveforms])  # [B]
    wavs = waveforms[0].new_zeros(len(waveforms), int(lengths.max()), *waveforms[0].shape[1:])
    for row, w in enumerate(waveforms):
        wavs[row, : w.shape[0]] = w
    return wavs, lengths


def collate_examples(examples: list[Example]) -> dict:
    """Pad waveforms [B, T_wav] (or cached frames [B, T_f, D_f]); keep texts and target ids as
    lists."""
    wavs, lengths = pad_waveforms([e.audio for e in examples])  # [B, T_wav], [B]
    return {
        "ids": [e.id for e in examples],
        "waveforms": wavs,
        "lengths": lengths,
        "texts": [e.text for e in examples],
        "responses": [e.response for e in examples],
    }


@dataclass
class PackedBatch:
    """Right-padded LLM inputs with the positions whose next-token logits predict the response."""

    embeds: torch.Tensor  # [B, T, D]
    mask: torch.Tensor  # [B, T]
    rows: torch.Tensor  # [N] row of each predicted response token
    cols: torch.Tensor  # [N] position whose output predicts it
    targets: torch.Tensor  # [N]


def pack_rows(
    llm: LoadedLLM,
    turns: Sequence[torch.Tensor],
    frame: PromptFrame,
    responses: Sequence[list[int]],
) -> PackedBatch:
    """Per-row turn embeddings [T_i, D] -> [prefix][turn][suffix][response] rows, right-padded."""
    device = llm.device
    prefix = llm.embed_tokens(torch.tensor(frame.prefix, dtype=torch.long))  # [T_p, D]
    suffix = llm.embed_tokens(torch.tensor(frame.suffix, dtype=torch.long))  # [T_s, D]
    rows_emb, rows, cols, targets = [], [], [], []
    for row, (turn, resp) in enumerate(zip(turns, responses, strict=True)):
        resp_t = torch.tensor(resp, dtype=torch.long, device=device)  # [N_i]
        seq = torch.cat(
            [prefix, turn.to(prefix.dtype), suffix, llm.embed_tokens(resp_t)]
        )  # [T_i, D]
        start = seq.shape[0] - len(resp)
        rows_emb.append(seq)
        rows.append(torch.full((len(resp),), row))
        cols.append(torch.arange(start - 1, seq.shape[0] - 1))
        targets.append(resp_t)
    width = max(r.shape[0] for r in rows_emb)
    embeds = prefix.new_zeros(len(rows_emb), width, prefix.shape[-1])  # [B, T, D]
    mask = torch.zeros(len(rows_emb), width, dtype=torch.long, device=device)  # [B, T]
    for row, seq in enumerate(rows_emb):
        embeds[row, : seq.shape[0]] = seq
        mask[row, : seq.shape[0]] = 1
    return PackedBatch(
        embeds, mask, torch.cat(rows).to(device), torch.cat(cols).to(device), torch.cat(targets)
    )


def response_logits(llm: LoadedLLM, batch: PackedBatch) -> torch.Tensor:
    """Logits [N, V] only at the positions that predict response tokens (saves the vocab matmul)."""
    hidden = llm.model.model(inputs_embeds=batch.embeds, attention_mask=batch.mask)
    picked = hidden.last_hidden_state[batch.rows, batch.cols]  # [N, D]
    return llm.model.lm_head(picked).float()  # [N, V]


def text_turns(llm: LoadedLLM, frame: PromptFrame, texts: Sequence[str]) -> list[torch.Tensor]:
    """Each transcript's embeddings as a typed turn [T_i, D], for the text-prompted teacher."""
    ids = [torch.tensor(frame.turn_ids(llm, t), dtype=torch.long) for t in texts]
    return [llm.embed_tokens(i) for i in ids]  # [T_i, D] each
