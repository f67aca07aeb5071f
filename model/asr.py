"""Cascade ASR: Whisper (tiny.en by default) with greedy or beam decoding, for transcripts and
baselines.

Dims: B windows in a batch, T_wav samples, F mel bins, T_mel mel frames, T_enc encoder frames,
D width, V vocabulary, L tokens so far, K beams.

Short loops of our own rather than `generate`: Whisper's generation mixin expects a hub
`generation_config` that the bundled CT2 model does not carry.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

from model.config import SAMPLE_RATE
from model.errors import CheckpointFormatError
from model.whisper_ct2 import default_ct2_dir, load_whisper, read_ct2_config

logger = logging.getLogger(__name__)

WINDOW_SECONDS = 30  # s, Whisper's fixed input span
WINDOW_SAMPLES = WINDOW_SECONDS * SAMPLE_RATE  # samples
MAX_NEW_TOKENS = 224  # tokens per window, half the decoder context as in openai/whisper
BATCH_WINDOWS = 8  # windows decoded together, bounding memory on long inputs
MULTILINGUAL_VOCAB = 51865  # vocab size of multilingual Whisper (English-only has 51864)


@dataclass(frozen=True)
class DecodingTokens:
    """The token ids greedy decoding needs, looked up by name in the tokenizer."""

    prompt: tuple[int, ...]  # <|startoftranscript|> [<|en|><|transcribe|>] <|notimestamps|>
    end: int  # <|endoftext|>
    suppress: tuple[int, ...]  # never emitted
    suppress_begin: tuple[int, ...]  # not emitted as the first token (blank, <|endoftext|>)


def _token_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise CheckpointFormatError(f"Whisper tokenizer has no {token} token")
    return token_id


def build_decoding_tokens(
    tokenizer: Tokenizer, vocab_size: int, suppress: list[int], suppress_begin: list[int]
) -> DecodingTokens:
    """Ids for the transcribe prompt; timestamp tokens (ids past <|notimestamps|>) are suppressed
    as well, since we ask for none and the tokenizer has no text for them."""
    no_ts = _token_id(tokenizer, "<|notimestamps|>")
    prompt = [_token_id(tokenizer, "<|startoftranscript|>")]
    if vocab_size >= MULTILINGUAL_VOCAB:
        prompt += [_token_id(tokenizer, "<|en|>"), _token_id(tokenizer, "<|transcribe|>")]
    return DecodingTokens(
        prompt=(*prompt, no_ts),
        end=_token_id(tokenizer, "<|endoftext|>"),
        suppress=tuple(sorted({*suppress, *range(no_ts, vocab_size)})),
        suppress_begin=tuple(suppress_begin),
    )


def split_windows(waveform: torch.Tensor) -> list[torch.Tensor]:
    """[T_wav] -> consecutive windows of at most 30 s, each [<= WINDOW_SAMPLES]."""
    return list(torch.split(waveform, WINDOW_SAMPLES)) if waveform.numel() else []


class WhisperASR:
    """Waveforms at 16 kHz in, English text out."""

    def __init__(
        self,
        model: WhisperForConditionalGeneration,
        tokenizer: Tokenizer,
        tokens: DecodingTokens,
        device: str | torch.device = "cpu",
        max_new_tokens: int = MAX_NEW_TOKENS,
        beams: int = 1,
    ) -> None:
        if beams < 1:
            raise ValueError(f"beams must be at least 1, got {beams}")
        self.device = torch.device(device)
        self.max_new_tokens = max_new_tokens
        self.beams = beams
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.tokens = tokens
        self.features = WhisperFeatureExtractor(
            feature_size=model.config.num_mel_bins, sampling_rate=SAMPLE_RATE
        )

    @classmethod
    def from_source(
        cls, source: str = "default", device: str = "cpu", beams: int = 1
    ) -> WhisperASR:
        """ "default" (bundled tiny.en), "tiny-random" (bundled tokenizer) or a local HF dir;
        `beams` 1 decodes greedily."""
        return cls(*load_whisper_decoding(source), device, beams=beams)

    def transcribe(self, waveform: torch.Tensor) -> str:
        """Mono 16 kHz float waveform [T_wav] -> text; over 30 s is decoded in 30 s windows."""
        return self.transcribe_batch([waveform])[0]

    @torch.inference_mode()
    def transcribe_batch(self, waveforms: list[torch.Tensor]) -> list[str]:
        """Several mono 16 kHz waveforms -> their texts, windows of all of them batched together."""
        windows, owners = clip_windows(waveforms)
        pieces: list[list[str]] = [[] for _ in waveforms]
        for start in range(0, len(windows), BATCH_WINDOWS):
            batch = windows[start : start + BATCH_WINDOWS]
            texts = self.transcribe_windows(batch)
            for owner, text in zip(owners[start : start + len(batch)], texts, strict=True):
                pieces[owner].append(text)
        return [" ".join(p for p in parts if p) for parts in pieces]

    def transcribe_windows(self, windows: list[torch.Tensor]) -> list[str]:
        """Windows of at most 30 s -> one text each."""
        ids, _ = decode_windows(
            self.model, self.features, self.tokens, windows, self.max_new_tokens, self.beams
        )
        return [self.tokenizer.decode(seq, skip_special_tokens=True).strip() for seq in ids]

    def decode_greedy(self, enc: torch.Tensor) -> list[list[int]]:
        """Encoder states [B, T_enc, D] -> generated ids per window, up to <|endoftext|>."""
        ids, _ = greedy_decode(self.model, self.tokens, enc, self.max_new_tokens)
        return ids


def clip_windows(waveforms: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
    """Mono waveforms, each [T_wav] -> their windows of at most 30 s in order (float32, on the
    CPU), and the index of the waveform each window came from."""
    windows: list[torch.Tensor] = []
    owners: list[int] = []
    for i, wav in enumerate(waveforms):
        if wav.dim() != 1:
            raise ValueError(f"expected a mono waveform [T_wav], got shape {tuple(wav.shape)}")
        parts = split_windows(wav.detach().float().cpu())
        windows += parts
        owners += [i] * len(parts)
    return windows, owners


def decode_windows(
    model: WhisperForConditionalGeneration,
    features: WhisperFeatureExtractor,
    tokens: DecodingTokens,
    windows: list[torch.Tensor],
    max_new_tokens: int,
    beams: int = 1,
) -> tuple[list[list[int]], torch.Tensor]:
    """Windows of at most 30 s (CPU) -> Whisper's log-mel over 30 s, its encoder and decoding,
    greedy or with `beams` beams: (ids per window, decoder states [B, L, D]), as `greedy_decode`."""
    arrays = [w.numpy() for w in windows]
    feats = features(arrays, sampling_rate=SAMPLE_RATE, return_tensors="pt")
    mel = feats["input_features"].to(model.device, model.dtype)  # [B, F, 3000]
    enc = model.model.encoder(mel).last_hidden_state  # [B, 1500, D]
    if beams == 1:
        return greedy_decode(model, tokens, enc, max_new_tokens)
    ids = beam_decode(model, tokens, enc, max_new_tokens, beams)
    return ids, forced_states(model, tokens, enc, ids)


def load_whisper_decoding(
    source: str,
) -> tuple[WhisperForConditionalGeneration, Tokenizer, DecodingTokens]:
    """Whisper, its tokenizer and the ids greedy decoding needs, from "default" (bundled tiny.en),
    "tiny-random" (bundled tokenizer) or a local HF dir."""
    model, config = load_whisper(source)
    if source in ("default", "tiny-random"):
        ct2_dir = default_ct2_dir()
        ct2 = read_ct2_config(ct2_dir)
        tokenizer = Tokenizer.from_file(str(ct2_dir / "tokenizer.json"))
        suppress, begin = ct2["suppress_ids"], ct2["suppress_ids_begin"]
    else:
        tokenizer = Tokenizer.from_file(str(Path(source).expanduser() / "tokenizer.json"))
        gen = model.generation_config
        suppress = list(gen.suppress_tokens or config.suppress_tokens or [])
        begin = list(gen.begin_suppress_tokens or config.begin_suppress_tokens or [])
    return model, tokenizer, build_decoding_tokens(tokenizer, config.vocab_size, suppress, begin)


def greedy_decode(
    model: WhisperForConditionalGeneration,
    tokens: DecodingTokens,
    enc: torch.Tensor,
    max_new_tokens: int,
) -> tuple[list[list[int]], torch.Tensor]:
    """Encoder states [B, T_enc, D] -> (generated ids per window, up to <|endoftext|>; the
    decoder's final states [B, L, D], step l's being the one that chose token l)."""
    b = enc.shape[0]
    device = enc.device
    prompt = torch.tensor(tokens.prompt, device=device)  # [L0]
    inputs = prompt.expand(b, -1)  # [B, L0]
    suppress = torch.tensor(tokens.suppress, device=device)  # [S]
    begin = torch.tensor(tokens.suppress_begin, device=device)  # [S0]
    done = torch.zeros(b, dtype=torch.bool, device=device)  # [B]
    out_ids: list[torch.Tensor] = []
    states: list[torch.Tensor] = []
    cache = None
    for step in range(max_new_tokens):
        out = model.model.decoder(
            input_ids=inputs, encoder_hidden_states=enc, cache=cache, use_cache=True
        )
        cache = out.cache
        state = out.last_hidden_state[:, -1]  # [B, D]
        logits = model.proj_out(state).float()  # [B, V]
        logits[:, suppress] = -torch.inf
        if step == 0:
            logits[:, begin] = -torch.inf
        next_ids = logits.argmax(dim=-1).masked_fill(done, tokens.end)  # [B]
        out_ids.append(next_ids)
        states.append(state)
        done |= next_ids == tokens.end
        if bool(done.all()):
            break
        inputs = next_ids[:, None]  # [B, 1]
    ids = torch.stack(out_ids, dim=1).tolist()  # [B, L]
    trimmed = [seq[: seq.index(tokens.end)] if tokens.end in seq else seq for seq in ids]
    return trimmed, torch.stack(states, dim=1)  # [B, L, D]


def step_logprobs(
    model: WhisperForConditionalGeneration, tokens: DecodingTokens, state: torch.Tensor, first: bool
) -> torch.Tensor:
    """Decoder states [N, D] -> next-token log-probabilities [N, V], float32, with the suppressed
    tokens (and, at the first step, those barred from starting) at -inf."""
    logits = model.proj_out(state).float()  # [N, V]
    logits[:, list(tokens.suppress)] = -torch.inf
    if first:
        logits[:, list(tokens.suppress_begin)] = -torch.inf
    return logits.log_softmax(dim=-1)  # [N, V]


def beam_decode(
    model: WhisperForConditionalGeneration,
    tokens: DecodingTokens,
    enc: torch.Tensor,
    max_new_tokens: int,
    beams: int,
) -> list[list[int]]:
    """Encoder states [B, T_enc, D] -> per window, the ids (up to <|endoftext|>) of the finished
    hypothesis with the best mean log-probability per token (the end token counted), after
    `beams` hypotheses have finished or the steps run out (then the live beams count too)."""
    b, k, end = enc.shape[0], beams, tokens.end
    enc = enc.repeat_interleave(k, dim=0)  # [B*K, T_enc, D]
    inputs = torch.tensor(tokens.prompt, device=enc.device).expand(b * k, -1)  # [B*K, L0]
    scores = torch.full((b, k), -torch.inf, device=enc.device)  # [B, K]
    scores[:, 0] = 0.0  # one live beam until the first step branches
    history = torch.zeros(b, k, 0, dtype=torch.long, device=enc.device)  # [B, K, L]
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
    cache = None
    for step in range(max_new_tokens):
        out = model.model.decoder(
            input_ids=inputs, encoder_hidden_states=enc, cache=cache, use_cache=True
        )
        cache = out.cache
        logp = step_logprobs(model, tokens, out.last_hidden_state[:, -1], step == 0)  # [B*K, V]
        total = (scores[..., None] + logp.view(b, k, -1)).view(b, -1)  # [B, K*V]
        top = total.topk(2 * k, dim=-1)  # [B, 2K]: enough to keep K live past any ends
        src = torch.zeros(b, k, dtype=torch.long)  # [B, K] beam each new beam extends
        nxt = torch.full((b, k), end, dtype=torch.long)  # [B, K] its new token
        scores = torch.full((b, k), -torch.inf)  # [B, K]
        for w in range(b):
            live = 0
            for value, flat in zip(top.values[w].tolist(), top.indices[w].tolist(), strict=True):
                if value == -torch.inf or live == k or len(finished[w]) >= k:
                    break
                beam, token = divmod(flat, logp.shape[-1])
                if token == end:
                    seq = history[w, beam].tolist()
                    finished[w].append((value / (len(seq) + 1), seq))
                else:
                    src[w, live], nxt[w, live], scores[w, live] = beam, token, value
                    live += 1
        scores = scores.to(enc.device)
        if all(len(f) >= k for f in finished) or not bool(scores.isfinite().any()):
            break
        src, nxt = src.to(enc.device), nxt.to(enc.device)
        rows = (torch.arange(b, device=enc.device)[:, None] * k + src).view(-1)  # [B*K]
        cache.self_attention_cache.reorder_cache(rows)  # cross-attention is the same per window
        picked = history.gather(1, src[..., None].expand(-1, -1, history.shape[2]))  # [B, K, L]
        history = torch.cat([picked, nxt[..., None]], dim=2)  # [B, K, L+1]
        inputs = nxt.view(-1, 1)  # [B*K, 1]
    for w in range(b):
        for beam in range(k):
            if len(finished[w]) < k and bool(scores[w, beam].isfinite()):
                seq = history[w, beam].tolist()
                finished[w].append((float(scores[w, beam]) / (len(seq) + 1), seq))
    return [max(f, key=lambda entry: entry[0])[1] if f else [] for f in finished]


def forced_states(
    model: WhisperForConditionalGeneration,
    tokens: DecodingTokens,
    enc: torch.Tensor,
    ids: list[list[int]],
) -> torch.Tensor:
    """Encoder states [B, T_enc, D] and chosen ids per window -> the decoder's final states
    [B, L, D] with the ids fed in (teacher forcing), step l's being the one before token l, as
    `greedy_decode` returns them; L is the longest sequence plus its end."""
    length = max(len(seq) for seq in ids) + 1
    rows = [list(tokens.prompt) + seq + [tokens.end] * (length - 1 - len(seq)) for seq in ids]
    inputs = torch.tensor(rows, device=enc.device)  # [B, L0 + L - 1]
    out = model.model.decoder(input_ids=inputs, encoder_hidden_states=enc, use_cache=False)
    first = len(tokens.prompt) - 1
    return out.last_hidden_state[:, first : first + length]  # [B, L, D]
