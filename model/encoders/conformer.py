"""The paper's encoder: log-mels -> conv subsampling -> conformer -> frames stacked to LLM width.

Dims: B batch, T_wav samples, T_f feature frames (10 ms), T subsampled frames (40 ms by default),
T_out embeddings (80 ms by default), F mel bins, C conv channels, D d_model, D_llm LLM width,
V CTC vocabulary.

torchaudio's conformer layer lets padded frames leak into valid ones through its depthwise
convolution, so the layers are run here with padding zeroed before that convolution (as ESPnet
and WeNet do); modules and weights stay torchaudio's, so state dicts match its `Conformer`.
"""

from __future__ import annotations

import math

import torch
import torchaudio
from torch import nn

from model.config import EncoderConfig
from model.encoders.base import AudioEncoder, FrameStacker, lengths_to_mask
from model.features import LogMelFrontend

SUBSAMPLING_KERNEL = 3  # feature frames (and mel bins) per conv window
SUBSAMPLING_STRIDE = 2  # feature frames per conv step


def count_subsampled(lengths: torch.Tensor, num_convs: int) -> torch.Tensor:
    """Frames [B] before `num_convs` unpadded stride-2 convs -> frames [B] after them."""
    for _ in range(num_convs):
        lengths = torch.div(lengths - SUBSAMPLING_KERNEL, SUBSAMPLING_STRIDE, rounding_mode="floor")
        lengths = (lengths + 1).clamp(min=0)  # [B]
    return lengths


def count_min_samples(config: EncoderConfig) -> int:
    """Fewest samples that yield one conformer frame; shorter clips get silence up to it."""
    frames = 1
    for _ in range(int(math.log2(config.subsampling))):
        frames = (frames - 1) * SUBSAMPLING_STRIDE + SUBSAMPLING_KERNEL
    return config.features.n_fft + (frames - 1) * config.features.hop_length


class Conv2dSubsampler(nn.Module):
    """log2(factor) stride-2 3x3 convs with ReLU over (time, mel), then a linear to d_model."""

    def __init__(self, n_mels: int, d_model: int, factor: int) -> None:
        super().__init__()
        self.num_convs = int(math.log2(factor))
        layers: list[nn.Module] = []
        for i in range(self.num_convs):
            in_channels = 1 if i == 0 else d_model
            layers += [
                nn.Conv2d(in_channels, d_model, SUBSAMPLING_KERNEL, SUBSAMPLING_STRIDE),
                nn.ReLU(),
            ]
        self.convs = nn.Sequential(*layers)
        mels_out = int(count_subsampled(torch.tensor([n_mels]), self.num_convs)[0])
        self.out = nn.Linear(d_model * mels_out, d_model)

    def forward(
        self, features: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """features [B, T_f, F], lengths [B] -> (frames [B, T, D], lengths [B])."""
        x = self.convs(features[:, None])  # [B, C, T, F']
        b, c, t, f = x.shape
        x = self.out(x.transpose(1, 2).reshape(b, t, c * f))  # [B, T, D]
        return x, count_subsampled(lengths, self.num_convs)  # [B]


def apply_masked_convolution(
    module: nn.Module, x: torch.Tensor, padding: torch.Tensor
) -> torch.Tensor:
    """torchaudio's conformer convolution module with padding zeroed before the depthwise conv.

    x [T, B, D], padding [B, T] True at padded frames -> [T, B, D]."""
    pointwise_in, glu, depthwise, norm, activation, pointwise_out, dropout = module.sequential
    h = module.layer_norm(x).permute(1, 2, 0)  # [B, D, T]
    h = glu(pointwise_in(h))  # [B, D, T]
    h = h.masked_fill(padding[:, None], 0.0)  # [B, D, T]
    h = activation(norm(depthwise(h)))  # [B, D, T]
    return dropout(pointwise_out(h)).permute(2, 0, 1)  # [T, B, D]


def apply_conformer_layer(layer: nn.Module, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    """One torchaudio `ConformerLayer` (attention before convolution), padding-safe.

    x [T, B, D], padding [B, T] True at padded frames -> [T, B, D]."""
    x = layer.ffn1(x) * 0.5 + x  # [T, B, D]
    h = layer.self_attn_layer_norm(x)  # [T, B, D]
    h, _ = layer.self_attn(h, h, h, key_padding_mask=padding, need_weights=False)  # [T, B, D]
    x = layer.self_attn_dropout(h) + x  # [T, B, D]
    x = apply_masked_convolution(layer.conv_module, x, padding) + x  # [T, B, D]
    x = layer.ffn2(x) * 0.5 + x  # [T, B, D]
    return layer.final_layer_norm(x)  # [T, B, D]


class ConformerEncoder(AudioEncoder):
    """AudioChatLlama's encoder: 80 log-mels, conv subsampling, conformer, stacked to ~80 ms."""

    def __init__(self, config: EncoderConfig, spec_augment: bool = True) -> None:
        super().__init__()
        if config.kind != "conformer":
            raise ValueError(f"ConformerEncoder needs kind 'conformer', got {config.kind!r}")
        self.config = config
        self.min_samples = count_min_samples(config)
        self.frontend = LogMelFrontend(config.features, spec_augment=spec_augment)
        self.subsampler = Conv2dSubsampler(
            config.features.n_mels, config.d_model, config.subsampling
        )
        self.conformer = torchaudio.models.Conformer(
            input_dim=config.d_model,
            num_heads=config.num_heads,
            ffn_dim=config.ffn_dim,
            num_layers=config.num_layers,
            depthwise_conv_kernel_size=config.kernel_size,
            dropout=config.dropout,
        )
        self.stacker = FrameStacker(config.d_model, k=config.stack, out_dim=config.llm_hidden)
        # index 0 is the CTC blank (torch's ctc_loss default); the vocabulary is the trainer's
        self.ctc_head = (
            nn.Linear(config.d_model, config.ctc_vocab) if config.ctc_vocab > 0 else None
        )

    def prepare_waveforms(
        self, waveforms: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero each row past its length and pad clips shorter than `min_samples` with silence.

        waveforms [B, T_wav], lengths [B] -> (waveforms [B, max(T_wav, min)], lengths [B])."""
        if waveforms.ndim != 2 or lengths.shape != waveforms.shape[:1]:
            raise ValueError(
                f"expected waveforms [B, T_wav] and lengths [B], got {tuple(waveforms.shape)} "
                f"and {tuple(lengths.shape)}"
            )
        lengths = lengths.to(waveforms.device, torch.long)  # [B]
        valid = lengths_to_mask(lengths, waveforms.shape[1])  # [B, T_wav]
        waveforms = waveforms.masked_fill(~valid, 0.0)  # [B, T_wav]
        short = self.min_samples - waveforms.shape[1]
        if short > 0:
            waveforms = nn.functional.pad(waveforms, (0, short))  # [B, min_samples]
        return waveforms, lengths.clamp(min=self.min_samples)  # [B]

    def encode_frames(
        self, waveforms: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """waveforms [B, T_wav], lengths [B] samples -> (conformer outputs [B, T, D], lengths [B]);
        padded frames are zero."""
        waveforms, lengths = self.prepare_waveforms(waveforms, lengths)  # [B, T_wav]
        features, feature_lengths = self.frontend(waveforms, lengths)  # [B, T_f, F]
        x, frame_lengths = self.subsampler(features, feature_lengths)  # [B, T, D]
        padding = ~lengths_to_mask(frame_lengths, x.shape[1])  # [B, T]
        h = x.transpose(0, 1)  # [T, B, D]
        for layer in self.conformer.conformer_layers:
            h = apply_conformer_layer(layer, h, padding)  # [T, B, D]
        h = h.transpose(0, 1).masked_fill(padding[..., None], 0.0)  # [B, T, D]
        return h, frame_lengths

    def forward(
        self, waveforms: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """waveforms [B, T_wav] in [-1, 1], lengths [B] samples ->
        (embeddings [B, T_out, D_llm], lengths [B] valid embeddings per row)."""
        frames, frame_lengths = self.encode_frames(waveforms, lengths)  # [B, T, D]
        return self.stacker(frames, frame_lengths)  # [B, T_out, D_llm]

    def forward_ctc(
        self, waveforms: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """waveforms [B, T_wav], lengths [B] samples -> (log_probs [B, T, V] float32, lengths [B]),
        per subsampled frame, for character CTC pretraining (ctc_loss wants [T, B, V])."""
        if self.ctc_head is None:
            raise ValueError("this encoder has no CTC head; build it with ctc_vocab > 0")
        frames, frame_lengths = self.encode_frames(waveforms, lengths)  # [B, T, D]
        logits = self.ctc_head(frames)  # [B, T, V]
        return logits.float().log_softmax(dim=-1), frame_lengths  # [B, T, V]
