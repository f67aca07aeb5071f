"""The `whisper_decoder` encoder kind: frozen Whisper (encoder and decoder) decodes, greedily or by
beam search (`asr_beams`), and the decoder's state at each emitted token becomes one LLM
embedding: the LLM's own embedding of the tokens Whisper found likeliest there, mixed by Whisper's
probabilities, plus a trained correction.

The other kinds ask an adapter to learn, from a few hours of speech, where every word sits in the
LLM's embedding space; on a CPU budget they lose content words. Here Whisper's decoder names the
words and the LLM's embedding table places them, so training only refines a mapping that already
carries the question. Nothing is discrete: each embedding mixes the top candidates' LLM
embeddings by Whisper's probabilities, so ASR uncertainty reaches the LLM, and the trained
correction (an MLP on the decoder state, zero at the start) carries what the words leave out.

Dims: B batch, T_wav samples, W 30 s windows, L decoder steps, D Whisper width, V Whisper text
vocabulary, K candidates per step, P LLM pieces per Whisper token, D_llm LLM width.

Our own module because no library maps one tokenizer's tokens onto another LLM's embeddings; the
windowing, log-mel, Whisper encoder and greedy loop are the cascade's (`model.asr.decode_windows`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import WhisperFeatureExtractor

from model.asr import MAX_NEW_TOKENS, clip_windows, decode_windows, load_whisper_decoding
from model.config import SAMPLE_RATE, EncoderConfig
from model.encoders.base import AudioEncoder, lengths_to_mask

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from model.llm import LoadedLLM

MAX_PIECES = 6  # LLM tokens kept per Whisper token (longer ones are rare byte runs)
PIECE_PREFIX = "\n"  # tokenised before each Whisper token so a leading space stays a word start


class WhisperDecoderEncoder(AudioEncoder):
    """Frozen Whisper transcribes; each emitted token's decoder state -> one LLM embedding."""

    def __init__(self, config: EncoderConfig, llm: LoadedLLM) -> None:
        super().__init__()
        self.config = config
        model, tokenizer, self.tokens = load_whisper_decoding(
            config.whisper_source, config.whisper_lora
        )
        self.whisper = model.eval().requires_grad_(False)
        self.features = WhisperFeatureExtractor(
            feature_size=model.config.num_mel_bins, sampling_rate=SAMPLE_RATE
        )
        d = model.config.d_model
        if llm.hidden_size != config.llm_hidden:
            raise ValueError(f"encoder llm_hidden {config.llm_hidden} != LLM's {llm.hidden_size}")
        pieces = whisper_to_llm_pieces(tokenizer, llm, self.tokens.end)  # [V, P]
        self.register_buffer("pieces", pieces, persistent=False)  # [V, P], -1 past the last
        blocked = torch.zeros(self.tokens.end, dtype=torch.bool)  # [V]
        blocked[[i for i in self.tokens.suppress if i < self.tokens.end]] = True
        self.register_buffer("blocked", blocked, persistent=False)  # [V], never decoded
        # the LLM's table, shared while both sit on one device (a 7B LLM's is 0.5 GB); not saved
        table = llm.model.get_input_embeddings().weight  # [V_llm, D_llm]
        self.register_buffer("llm_table", table.detach(), persistent=False)
        self.log_temperature = nn.Parameter(torch.zeros(()))
        self.correction = nn.Sequential(
            nn.LayerNorm(d),
            nn.Linear(d, config.adapter_hidden),
            nn.GELU(),
            nn.Linear(config.adapter_hidden, config.llm_hidden),
        )
        nn.init.zeros_(self.correction[-1].weight)  # start as the plain mixture
        nn.init.zeros_(self.correction[-1].bias)

    def train(self, mode: bool = True) -> WhisperDecoderEncoder:
        """Whisper stays in eval mode whatever `mode` says."""
        super().train(mode)
        self.whisper.eval()
        return self

    def forward(
        self, waveforms: torch.Tensor, lengths: torch.Tensor, precomputed: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """waveforms [B, T_wav] at 16 kHz, lengths [B] samples ->
        (embeddings [B, L, D_llm], lengths [B] valid embeddings per row).

        With `precomputed`, the inputs are `front()` outputs: decoder states [B, L, D], lengths."""
        if not precomputed:
            waveforms, lengths = self.front(waveforms, lengths)  # [B, L, D], [B]
        mixed = self.mixture(waveforms)  # [B, L, D_llm]
        out = mixed + self.correction(waveforms.float())  # [B, L, D_llm]
        return out * lengths_to_mask(lengths, out.shape[1])[..., None], lengths

    @torch.no_grad()
    def anchor(
        self, waveforms: torch.Tensor, lengths: torch.Tensor, precomputed: bool = False
    ) -> torch.Tensor:
        """The plain mixture, as the start's zero correction gives [B, L, D_llm]; `forward`'s
        output minus this is the correction alone."""
        if not precomputed:
            waveforms, lengths = self.front(waveforms, lengths)  # [B, L, D], [B]
        mixed = self.mixture(waveforms)  # [B, L, D_llm]
        return mixed * lengths_to_mask(lengths, mixed.shape[1])[..., None]

    def mixture(self, states: torch.Tensor) -> torch.Tensor:
        """Decoder states [B, L, D] -> the LLM embeddings of Whisper's top candidates mixed by
        its probabilities [B, L, D_llm], float32."""
        states = states.to(self.whisper.proj_out.weight.dtype)  # [B, L, D]
        text_vocab = self.pieces.shape[0]
        logits = (states @ self.whisper.proj_out.weight[:text_vocab].T).float()  # [B, L, V]
        logits = logits.masked_fill(self.blocked, -torch.inf)  # [B, L, V]
        top = logits.topk(self.config.soft_candidates, dim=-1)  # [B, L, K]
        probs = (top.values / self.log_temperature.exp()).softmax(-1)  # [B, L, K]
        return (probs[..., None] * self.token_embeddings(top.indices)).sum(2)  # [B, L, D_llm]

    @torch.no_grad()
    def scale_correction(self, scale: float) -> None:
        """Weight the trained correction by `scale` in every embedding (its last layer's weights
        scaled): 0 gives the untrained mixture, 1 the trained encoder, between them a point on
        the line from one to the other."""
        self.correction[-1].weight.mul_(scale)
        self.correction[-1].bias.mul_(scale)

    def token_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """Whisper text token ids [...] -> the mean LLM embedding of each one's pieces
        [..., D_llm], float32; computed once per distinct token (a batch's candidates repeat)."""
        distinct, where = tokens.unique(return_inverse=True)  # [U], [...]
        pieces = self.pieces[distinct]  # [U, P]
        valid = (pieces >= 0).float()  # [U, P]
        emb = self.llm_table[pieces.clamp(min=0)].float()  # [U, P, D_llm]
        means = (emb * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp(min=1)
        return means[where]  # [..., D_llm]

    @property
    def window_safe(self) -> bool:
        return False  # a piece boundary cuts a word, which the decoder then mishears

    @property
    def front_frozen(self) -> bool:
        return True  # all of Whisper is frozen

    @torch.no_grad()
    def front(
        self, waveforms: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """waveforms [B, T_wav], lengths [B] -> (decoder states at the emitted tokens [B, L, D],
        lengths [B]); a clip with no words keeps one state, the one that ended it."""
        clips = [waveforms[row, : int(lengths[row])] for row in range(waveforms.shape[0])]
        clips = [c if c.numel() else c.new_zeros(SAMPLE_RATE // 10) for c in clips]  # [T_wav]
        windows, owners = clip_windows(clips)
        ids, states = decode_windows(
            self.whisper, self.features, self.tokens, windows, MAX_NEW_TOKENS, self.config.asr_beams
        )  # states: [B_win, L_max, D]
        per_row: list[list[torch.Tensor]] = [[] for _ in range(waveforms.shape[0])]
        for win, owner in enumerate(owners):
            per_row[owner].append(states[win, : len(ids[win])])  # [L_win, D]
        rows = [torch.cat(parts) for parts in per_row]  # each [L_row, D]
        rows = [r if len(r) else states[owners.index(i), :1] for i, r in enumerate(rows)]
        out_lengths = torch.tensor([len(r) for r in rows], device=lengths.device)  # [B]
        return nn.utils.rnn.pad_sequence(rows, batch_first=True), out_lengths  # [B, L, D], [B]


def whisper_to_llm_pieces(tokenizer: Tokenizer, llm: LoadedLLM, text_vocab: int) -> torch.Tensor:
    """Each Whisper text token (ids below `text_vocab`) as the LLM tokens of its text
    [V, MAX_PIECES], -1 past the last; tokenised after PIECE_PREFIX so a token that starts a word
    gets the LLM's word-start pieces, and one that continues a word its continuation pieces."""
    texts = [PIECE_PREFIX + tokenizer.decode([w]) for w in range(text_vocab)]
    prefix = llm.tokenizer(PIECE_PREFIX, add_special_tokens=False)["input_ids"]
    encoded = llm.tokenizer(texts, add_special_tokens=False)["input_ids"]
    pieces = torch.full((text_vocab, MAX_PIECES), -1, dtype=torch.long)  # [V, P]
    for w, ids in enumerate(encoded):
        ids = ids[len(prefix) :] if ids[: len(prefix)] == prefix else ids
        ids = ids[:MAX_PIECES]
        pieces[w, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return pieces
