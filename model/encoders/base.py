"""The encoder interface and the frame-stacking projector both encoder kinds end with.

Dims: B batch, T_wav samples, T frames, D width, k frames stacked per embedding.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch
from torch import nn

from model.config import EncoderConfig

if TYPE_CHECKING:
    from model.llm import LoadedLLM


class AudioEncoder(nn.Module, ABC):
    """Waveforms at 16 kHz in, LLM-width embeddings out (one per ~80 ms from the frame-level
    kinds, one per emitted Whisper token from whisper_decoder)."""

    config: EncoderConfig

    @abstractmethod
    def forward(
        self, waveforms: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """waveforms [B, T_wav] float in [-1, 1], lengths [B] samples ->
        (embeddings [B, T, D_llm], lengths [B] valid embeddings per row)."""

    @property
    def front_frozen(self) -> bool:
        """True when everything `front` computes is frozen, so its outputs can be cached."""
        return False

    @property
    def window_safe(self) -> bool:
        """True when a clip encoded in consecutive pieces, embeddings joined, stays close to the
        clip encoded whole (frame-level encoders), so streamed audio can be encoded as it comes."""
        return True

    def front(
        self, waveforms: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """waveforms [B, T_wav], lengths [B] -> (frozen-part frames [B, T_f, D_f], lengths [B]);
        `forward(frames, lengths, precomputed=True)` then runs only the trained part."""
        raise NotImplementedError(f"{type(self).__name__} has no frozen front to precompute")

    @torch.no_grad()
    def encode_one(self, waveform: torch.Tensor) -> torch.Tensor:
        """One mono waveform [T_wav] -> its embeddings [T, D_llm] on the encoder's device."""
        param = next(self.parameters())
        wav = waveform.to(param.device, torch.float32)[None]  # [1, T_wav]
        lengths = torch.tensor([wav.shape[1]], device=param.device)  # [1]
        emb, emb_len = self(wav, lengths)  # [1, T, D_llm]
        return emb[0, : int(emb_len[0])]  # [T, D_llm]

    def anchor(
        self, waveforms: torch.Tensor, lengths: torch.Tensor, precomputed: bool = False
    ) -> torch.Tensor | None:
        """What `forward` would give with its trained part at its start [B, T, D_llm] (no
        gradient), for training to stay near; None where the start means nothing (random)."""
        return None

    def stored_dtype(self, name: str) -> torch.dtype:
        """The dtype a checkpoint stores trained weight `name` in."""
        return torch.float32

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def lr_groups(self, pretrained_scale: float) -> list[dict]:
        """Optimizer groups of the trained parameters, each with its `lr_scale`: weights that
        came pretrained train at `pretrained_scale` of the schedule's rate, new ones at 1."""
        groups: dict[float, list[nn.Parameter]] = {}
        for name, param in self.named_parameters():
            if param.requires_grad:
                scale = pretrained_scale if self.pretrained(name) else 1.0
                groups.setdefault(scale, []).append(param)
        return [{"params": params, "lr_scale": scale} for scale, params in groups.items()]

    def pretrained(self, name: str) -> bool:
        """Whether weight `name` starts from pretrained values (not trained from scratch)."""
        return False


class FrameStacker(nn.Module):
    """Stacks k consecutive frames, then projects to the LLM width (ultravox-style projector)."""

    def __init__(self, in_dim: int, k: int, out_dim: int, hidden: int | None = None) -> None:
        super().__init__()
        self.k = k
        hidden = hidden or out_dim
        self.proj = nn.Sequential(
            nn.LayerNorm(in_dim * k),
            nn.Linear(in_dim * k, hidden),
            nn.GELU(),
            nn.Linear(hidden, out_dim),
        )

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D_in], lengths [B] -> ([B, ceil(T/k), D_out], lengths [B])."""
        b, t, d = x.shape
        pad = (-t) % self.k
        x = nn.functional.pad(x, (0, 0, 0, pad))  # [B, T + pad, D_in]
        x = x.reshape(b, (t + pad) // self.k, d * self.k)  # [B, T', k * D_in]
        out = self.proj(x)  # [B, T', D_out]
        return out, torch.div(lengths + self.k - 1, self.k, rounding_mode="floor")  # [B]


def lengths_to_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """lengths [B] -> boolean mask [B, max_len], True where a position is valid."""
    return torch.arange(max_len, device=lengths.device)[None] < lengths[:, None]  # [B, max_len]


def build_encoder(config: EncoderConfig, llm: LoadedLLM | None = None) -> AudioEncoder:
    """A fresh encoder of the configured kind (the whisper kinds load pretrained Whisper weights;
    whisper_decoder also reads `llm`'s tokenizer and embedding table)."""
    if config.kind == "conformer":
        from model.encoders.conformer import ConformerEncoder

        return ConformerEncoder(config)
    if config.kind == "whisper_decoder":
        from model.encoders.whisper_decoder import WhisperDecoderEncoder

        if llm is None:
            raise ValueError("a whisper_decoder encoder needs the loaded LLM it feeds")
        return WhisperDecoderEncoder(config, llm)
    from model.encoders.whisper import WhisperAudioEncoder

    return WhisperAudioEncoder(config)
