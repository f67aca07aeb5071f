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
from torch import nn
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
        cls, source: str = "default", device: str = "cpu", beams: int = 1, lora: str | None = None
    ) -> WhisperASR:
        """ "default" (bundled tiny.en), "tiny-random" (bundled tokenizer) or a local HF dir;
        `beams` 1 decodes greedily; `lora`: a `tune-asr` adapter folder merged in."""
        return cls(*load_whisper_decoding(source, lora), device, beams=beams)

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
    return beam_decode(model, tokens, enc, max_new_tokens, beams)


def load_whisper_decoding(
    source: str, lora: str | Path | None = None
) -> tuple[WhisperForConditionalGeneration, Tokenizer, DecodingTokens]:
    """Whisper, its tokenizer and the ids greedy decoding needs, from "default" (bundled tiny.en),
    "tiny-random" (bundled tokenizer) or a local HF dir; `lora`: a folder of peft LoRA adapters
    (`speechchat tune-asr`), merged into the weights so decoding costs what it did."""
    model, config = load_whisper(source)
    if lora is not None:
        model = merge_lora(model, Path(lora))
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


def merge_lora(model: WhisperForConditionalGeneration, folder: Path):
    """`model` with the peft adapters in `folder` added into its weights (peft's merge)."""
    from peft import PeftModel

    if not (folder / "adapter_config.json").is_file():
        raise CheckpointFormatError(f"{folder} holds no LoRA adapters (adapter_config.json)")
    return PeftModel.from_pretrained(model, str(folder)).merge_and_unload().eval()


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
        logits = allowed_logits(model, tokens, state, step == 0)  # [B, V]
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


def vocab_logits(model: WhisperForConditionalGeneration, state: torch.Tensor) -> torch.Tensor:
    """Decoder states [N, D] -> logits over the vocabulary [N, V], float32. Computed as table @
    states^T: on a CPU `proj_out` itself reads tiny.en's 80 MB table 2-4x slower for a few rows
    (2 threads: one row 8.7 ms against 2.9, four 14.5 against 3.8), and one row is slowest of
    all, so it goes in twice."""
    weight = model.proj_out.weight  # [V, D]
    rows = state.repeat(2, 1) if state.shape[0] == 1 and state.device.type == "cpu" else state
    return (weight @ rows.T).T[: state.shape[0]].float()  # [N, V]


def allowed_logits(
    model: WhisperForConditionalGeneration, tokens: DecodingTokens, state: torch.Tensor, first: bool
) -> torch.Tensor:
    """Decoder states [N, D] -> next-token logits [N, V], float32, with the suppressed tokens
    (and, at the first step, those barred from starting) at -inf: both searches' one rule."""
    logits = vocab_logits(model, state)  # [N, V]
    logits[:, list(tokens.suppress)] = -torch.inf
    if first:
        logits[:, list(tokens.suppress_begin)] = -torch.inf
    return logits


def beam_decode(
    model: WhisperForConditionalGeneration,
    tokens: DecodingTokens,
    enc: torch.Tensor,
    max_new_tokens: int,
    beams: int,
) -> tuple[list[list[int]], torch.Tensor]:
    """Encoder states [B, T_enc, D] -> as `greedy_decode`, (ids per window up to <|endoftext|>,
    the decoder states along them [B, L, D]) for the finished hypothesis with the best mean
    log-probability per token (the end counted), once `beams` have finished or the steps run out
    (then the live beams count too). The first step runs once per window; its caches then branch."""
    b, k, end = enc.shape[0], beams, tokens.end
    d, device = enc.shape[-1], enc.device
    inputs = torch.tensor(tokens.prompt, device=device).expand(b, -1)  # [B, L0]
    scores = torch.zeros(b, 1, device=device)  # [B, K'], one beam per window before the branch
    history = torch.zeros(b, 1, 0, dtype=torch.long, device=device)  # [B, K', L]
    trail = torch.zeros(b, 1, 0, d, device=device)  # [B, K', L, D] states that chose them
    finished: list[list[tuple[float, list[int], torch.Tensor]]] = [[] for _ in range(b)]
    cache = None
    for step in range(max_new_tokens):
        out = model.model.decoder(
            input_ids=inputs, encoder_hidden_states=enc, cache=cache, use_cache=True
        )
        cache = out.cache
        state = out.last_hidden_state[:, -1].view(b, -1, d)  # [B, K', D]
        logits = allowed_logits(model, tokens, state.view(-1, d), step == 0)  # [B*K', V]
        logp = logits.log_softmax(dim=-1)  # [B*K', V]
        vocab = logp.shape[-1]
        total = (scores[..., None] + logp.view(b, -1, vocab)).view(b, -1)  # [B, K'*V]
        top = total.topk(2 * k, dim=-1)  # [B, 2K]: enough to keep K live past any ends
        src = torch.zeros(b, k, dtype=torch.long)  # [B, K] beam each new beam extends
        nxt = torch.full((b, k), end, dtype=torch.long)  # [B, K] its new token
        scores = torch.full((b, k), -torch.inf)  # [B, K]
        for w in range(b):
            live = 0
            for value, flat in zip(top.values[w].tolist(), top.indices[w].tolist(), strict=True):
                if value == -torch.inf or live == k or len(finished[w]) >= k:
                    break
                beam, token = divmod(flat, vocab)
                if token == end:
                    seq = history[w, beam].tolist()
                    states = torch.cat([trail[w, beam], state[w, beam, None]])  # [L+1, D]
                    finished[w].append((value / (len(seq) + 1), seq, states))
                else:
                    src[w, live], nxt[w, live], scores[w, live] = beam, token, value
                    live += 1
        scores = scores.to(device)
        if all(len(f) >= k for f in finished) or not bool(scores.isfinite().any()):
            break
        src, nxt = src.to(device), nxt.to(device)
        rows = (torch.arange(b, device=device)[:, None] * history.shape[1] + src).view(-1)
        cache.self_attention_cache.reorder_cache(rows)  # [B*K] rows from [B*K'] ones
        if step == 0:  # the one cross-attention cache per window, copied to its beams
            cache.cross_attention_cache.reorder_cache(rows)
            enc = enc.repeat_interleave(k, dim=0)  # [B*K, T_enc, D]
        history = torch.cat([pick(history, src), nxt[..., None]], dim=2)  # [B, K, L+1]
        trail = torch.cat([pick(trail, src), pick(state[:, :, None], src)], dim=2)  # [B, K, L+1, D]
        inputs = nxt.view(-1, 1)  # [B*K, 1]
    for w in range(b):
        for beam in range(scores.shape[1]):
            if len(finished[w]) < k and bool(scores[w, beam].isfinite()):
                seq = history[w, beam].tolist()
                finished[w].append((float(scores[w, beam]) / (len(seq) + 1), seq, trail[w, beam]))
    best = [max(f, key=lambda entry: entry[0]) for f in finished]  # every window has one
    states = nn.utils.rnn.pad_sequence([entry[2] for entry in best], batch_first=True)
    return [entry[1] for entry in best], states  # [B, L, D]


def pick(beams: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Per-beam tensors [B, K', ...] -> the rows `src` [B, K] names, [B, K, ...]."""
    index = src.view(*src.shape, *([1] * (beams.dim() - 2)))  # [B, K, 1...]
    return beams.gather(1, index.expand(*src.shape, *beams.shape[2:]))
