"""The `whisper` encoder kind: Whisper's log-mel and encoder (pretrained, mostly frozen), then a
trained frame-stacking adapter to the LLM width.

Dims: B batch, T_wav samples, F mel bins, T_mel mel frames (10 ms), T_enc encoder frames (20 ms),
D Whisper width, T embeddings (20 ms x whisper_stack), D_llm LLM width, W 30 s windows.

We run transformers' Whisper encoder layers ourselves instead of `WhisperEncoder.forward` because
that forward demands 30 s of padded input and ignores attention masks; here a clip is encoded at
its own length and padded frames are masked, so a clip alone equals the clip inside a batch.
Clips longer than 30 s are cut into 30 s windows, encoded as separate rows, and their frames
joined in order before stacking (Whisper never saw more than 30 s at once).
"""

from __future__ import annotations

import dataclasses

import torch
import torchaudio
from torch import nn

from model.config import SAMPLE_RATE, EncoderConfig
from model.encoders.base import AudioEncoder, FrameStacker, lengths_to_mask
from model.whisper_ct2 import load_whisper

N_FFT = 400  # samples, 25 ms analysis window
HOP_LENGTH = 160  # samples, 10 ms between mel frames
WINDOW_SAMPLES = 30 * SAMPLE_RATE  # samples, the longest span Whisper encodes at once
POWER_FLOOR = 1e-10  # power, floor before log10 (as Whisper)
DYNAMIC_RANGE = 8.0  # log10 units kept below each clip's loudest frame
LOG_OFFSET = 4.0  # log10 units, Whisper's (x + 4) / 4 scaling
LOG_SCALE = 4.0
CONV_STRIDE = 2  # mel frames per encoder frame (conv2 stride)
WINDOW_FRAMES = (WINDOW_SAMPLES // HOP_LENGTH - 1) // CONV_STRIDE + 1  # encoder frames in 30 s


class WhisperLogMel(nn.Module):
    """Batched Whisper log-mel in torch; equals `WhisperFeatureExtractor` on each clip's frames.

    Samples past a row's length are zeroed and 200 zeros follow every clip, so a clip's last
    frames see silence, as they do in Whisper's 30 s zero padding, whatever the batch holds."""

    def __init__(self, n_mels: int) -> None:
        super().__init__()
        self.register_buffer("window", torch.hann_window(N_FFT), persistent=False)  # [N_FFT]
        filters = torchaudio.functional.melscale_fbanks(
            N_FFT // 2 + 1, 0.0, SAMPLE_RATE / 2, n_mels, SAMPLE_RATE, "slaney", "slaney"
        )  # [N_FFT // 2 + 1, F]
        self.register_buffer("filters", filters.T.contiguous(), persistent=False)  # [F, N_FFT//2+1]

    def forward(
        self, waveforms: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """waveforms [B, T_wav], lengths [B] samples -> (log-mel [B, F, T_mel], lengths [B])."""
        mel_lengths = torch.div(lengths, HOP_LENGTH, rounding_mode="floor").clamp(min=1)  # [B]
        t_mel = int(mel_lengths.max())
        valid = lengths_to_mask(lengths, waveforms.shape[1])  # [B, T_wav]
        wav = waveforms.float() * valid  # [B, T_wav]
        wav = nn.functional.pad(wav, (0, N_FFT // 2))  # [B, T_wav + N_FFT / 2]
        stft = torch.stft(wav, N_FFT, HOP_LENGTH, window=self.window, return_complex=True)
        # stft: [B, N_FFT // 2 + 1, (T_wav + N_FFT // 2) // HOP_LENGTH + 1] complex, T_mel kept
        power = stft[..., :t_mel].abs().square()  # [B, N_FFT // 2 + 1, T_mel]
        mel = self.filters @ power  # [B, F, T_mel]
        log_mel = mel.clamp(min=POWER_FLOOR).log10()  # [B, F, T_mel]
        frame_ok = lengths_to_mask(mel_lengths, t_mel)[:, None, :]  # [B, 1, T_mel]
        peak = log_mel.masked_fill(~frame_ok, -torch.inf).amax(dim=(1, 2), keepdim=True)  # [B,1,1]
        log_mel = torch.maximum(log_mel, peak - DYNAMIC_RANGE)  # [B, F, T_mel]
        log_mel = (log_mel + LOG_OFFSET) / LOG_SCALE * frame_ok  # [B, F, T_mel]
        return log_mel, mel_lengths


class WhisperAudioEncoder(AudioEncoder):
    """Whisper encoder (top `trainable_layers` trained, the rest frozen) + `FrameStacker`.

    The frozen part (log-mel, convolutions, the bottom layers, and the final norm when no layer
    trains) is the `front`, cacheable for training; the trained layers, the norm and the adapter
    run on its frames."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        model, whisper_config = load_whisper(config.whisper_source)
        self.whisper = model.model.encoder  # the decoder is dropped with `model`
        self.d_model = whisper_config.d_model
        self.log_mel = WhisperLogMel(whisper_config.num_mel_bins)
        self.adapter = FrameStacker(
            in_dim=self.d_model,
            k=config.whisper_stack,
            out_dim=config.llm_hidden,
            hidden=config.adapter_hidden,
        )
        self.trained_whisper = freeze_whisper(self.whisper, config.trainable_layers)
        self.train(self.training)

    @property
    def cut(self) -> int:
        """Index of the first trained Whisper layer (the number of frozen ones)."""
        return len(self.whisper.layers) - self.config.trainable_layers

    def set_trainable_layers(self, trainable_layers: int) -> None:
        """Train the top `trainable_layers` Whisper layers from now on (e.g. to fine-tune a
        checkpoint trained with its Whisper frozen); the config records it for saving."""
        self.trained_whisper = freeze_whisper(self.whisper, trainable_layers)
        self.config = dataclasses.replace(self.config, trainable_layers=trainable_layers)
        self.train(self.training)

    def pretrained(self, name: str) -> bool:
        return name.startswith("whisper.")

    def stored_dtype(self, name: str) -> torch.dtype:
        """Whisper's own weights come as float16 (CTranslate2); fine-tuned ones are stored so."""
        return torch.float16 if self.pretrained(name) else torch.float32

    def train(self, mode: bool = True) -> WhisperAudioEncoder:
        """Frozen Whisper parts stay in eval mode whatever `mode` says."""
        super().train(mode)
        self.whisper.eval()
        for module in self.trained_whisper:
            module.train(mode)
        return self

    def forward(
        self, waveforms: torch.Tensor, lengths: torch.Tensor, precomputed: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """waveforms [B, T_wav] at 16 kHz, lengths [B] samples ->
        (embeddings [B, T, D_llm], lengths [B] valid embeddings per row).

        With `precomputed`, the inputs are `front()` outputs [B, T_enc, D] and frame lengths."""
        if not precomputed:
            waveforms, lengths = self.front_frames(waveforms, lengths)  # [B, T_enc, D], [B]
        return self.adapter(*self.top(waveforms, lengths))  # [B, T, D_llm], [B]

    @property
    def front_frozen(self) -> bool:
        return True  # the front stops below the first trained layer

    def front(
        self, waveforms: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen part's frames [B, T_enc, D] and lengths [B], for caching."""
        with torch.no_grad():
            return self.front_frames(waveforms, lengths)

    def front_frames(
        self, waveforms: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """waveforms [B, T_wav], lengths [B] -> (frozen-part frames [B, T_enc, D], lengths [B])."""
        if waveforms.shape[1] <= WINDOW_SAMPLES:
            return self.front_window(waveforms, lengths)  # [B, T_enc, D]
        return self.front_long(waveforms, lengths)  # [B, T_enc, D]

    def front_window(
        self, waveforms: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Clips of at most 30 s [B, T_wav] -> (frozen-part frames [B, T_enc, D], zero past each
        row's length, and lengths [B] frames)."""
        enc = self.whisper
        mel, mel_lengths = self.log_mel(waveforms, lengths)  # [B, F, T_mel], [B]
        mel = mel.to(enc.conv1.weight.dtype)  # [B, F, T_mel]
        mel_ok = lengths_to_mask(mel_lengths, mel.shape[2])[:, None, :]  # [B, 1, T_mel]
        # zero past each clip, so the convolutions see what a lone clip's zero padding gives
        x = nn.functional.gelu(enc.conv1(mel)) * mel_ok  # [B, D, T_mel]
        x = nn.functional.gelu(enc.conv2(x)).transpose(1, 2)  # [B, T_enc, D]
        frame_lengths = torch.div(mel_lengths - 1, CONV_STRIDE, rounding_mode="floor") + 1  # [B]
        x = x + enc.embed_positions.weight[: x.shape[1]]  # [B, T_enc, D]
        return self.run_layers(x, frame_lengths, enc.layers[: self.cut], not self.trained_whisper)

    def top(self, frames: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Front frames [B, T_enc, D] -> the trained layers' and the final norm's [B, T_enc, D]
        (nothing when no layer trains); each 30 s window attends within itself, as in front."""
        if not self.trained_whisper:
            return frames, lengths
        if frames.shape[1] <= WINDOW_FRAMES:
            return self.run_layers(frames, lengths, self.whisper.layers[self.cut :], True)
        b, t, d = frames.shape
        windows, win_lengths, keep = split_windows(frames, lengths, WINDOW_FRAMES)
        # windows: [B * W, 1500, D], win_lengths and keep: [B * W]
        out, _ = self.run_layers(
            windows[keep], win_lengths[keep], self.whisper.layers[self.cut :], True
        )  # [B_kept, 1500, D]
        full = windows.new_zeros(windows.shape)  # [B * W, 1500, D]
        full[keep] = out
        return full.reshape(b, -1, d)[:, :t], lengths  # [B, T_enc, D], [B]

    def run_layers(
        self, x: torch.Tensor, lengths: torch.Tensor, layers: nn.ModuleList, norm: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T_enc, D] through `layers` (then the final norm if `norm`), padded frames masked
        out of attention and zeroed at the end -> ([B, T_enc, D], lengths [B])."""
        frame_ok = lengths_to_mask(lengths, x.shape[1])  # [B, T_enc]
        bias = torch.zeros(frame_ok.shape, dtype=x.dtype, device=x.device)  # [B, T_enc]
        bias = bias.masked_fill(~frame_ok, torch.finfo(x.dtype).min)  # [B, T_enc]
        bias = bias[:, None, None, :]  # [B, 1, 1, T_enc], additive key mask for every head
        for layer in layers:
            x = layer(x, bias)  # [B, T_enc, D]
        if norm:
            x = self.whisper.layer_norm(x)  # [B, T_enc, D]
        return x * frame_ok[..., None], lengths  # [B, T_enc, D], [B]

    def front_long(
        self, waveforms: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Clips over 30 s [B, T_wav] -> 30 s windows encoded as rows, frames joined per clip."""
        b = waveforms.shape[0]
        windows, win_lengths, keep = split_windows(waveforms, lengths, WINDOW_SAMPLES)
        # windows: [B * W, WINDOW_SAMPLES], win_lengths and keep: [B * W]
        n_win = windows.shape[0] // b
        frames, frame_lengths = self.front_window(windows[keep], win_lengths[keep])
        # frames: [B_kept, T_enc, D], frame_lengths: [B_kept]
        full = frames.new_zeros(b * n_win, WINDOW_FRAMES, frames.shape[2])  # [B * W, 1500, D]
        full[keep, : frames.shape[1]] = frames  # [B * W, 1500, D]
        all_lengths = torch.zeros(b * n_win, dtype=frame_lengths.dtype, device=lengths.device)
        all_lengths[keep] = frame_lengths  # [B * W]
        # every window but a clip's last is full, so each clip's frames are contiguous from 0
        out_lengths = all_lengths.reshape(b, n_win).sum(dim=1)  # [B]
        out = full.reshape(b, n_win * WINDOW_FRAMES, -1)  # [B, W * 1500, D]
        return out[:, : int(out_lengths.max())], out_lengths  # [B, T_enc, D], [B]


def split_windows(
    x: torch.Tensor, lengths: torch.Tensor, size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B, T, ...] (rows valid up to `lengths` [B]) zero-padded and cut into `size`-long
    windows -> (windows [B * W, size, ...], their valid lengths [B * W], keep [B * W]: the
    windows with content, and each row's first even when empty)."""
    b, t = x.shape[:2]
    n_win = -(-t // size)
    pad = [0, 0] * (x.ndim - 2) + [0, n_win * size - t]  # the time axis only
    windows = nn.functional.pad(x, pad).reshape(b * n_win, size, *x.shape[2:])
    starts = torch.arange(n_win, device=lengths.device) * size  # [W]
    win_lengths = (lengths[:, None] - starts).clamp(0, size)  # [B, W]
    keep = (win_lengths > 0) | (starts == 0)  # [B, W]
    return windows, win_lengths.reshape(-1), keep.reshape(-1)


def freeze_whisper(whisper: nn.Module, trainable_layers: int) -> list[nn.Module]:
    """Freezes all but the top `trainable_layers` layers (and the final norm when any train);
    returns the modules left trainable (all others must stay in eval mode)."""
    layers = whisper.layers
    if not 0 <= trainable_layers <= len(layers):
        raise ValueError(f"trainable_layers must be in [0, {len(layers)}], got {trainable_layers}")
    whisper.requires_grad_(False)
    cut = len(layers) - trainable_layers
    for layer in layers[cut:]:
        layer.requires_grad_(True)
    if trainable_layers:
        whisper.layer_norm.requires_grad_(True)
    return [*layers[cut:], whisper.layer_norm] if trainable_layers else []
