"""Log-mel front-end of the conformer encoder: per-utterance normalisation and SpecAugment.

Dims: B batch, T_wav samples, T frames (10 ms), F mel bins.

Frames are taken without centring (`center=False`), so every valid frame sees only valid samples:
a clip's features are the same alone or padded inside a batch.
"""

from __future__ import annotations

import torch
import torchaudio
from torch import nn

from model.config import FeatureConfig

LOG_FLOOR = 1e-6  # power, floor before the log so silence stays finite (-13.8 in log units)
NORM_EPS = 1e-5  # log-power units squared, keeps the std of a constant utterance finite
FREQ_MASK_BINS = 27  # mel bins, widest frequency mask (SpecAugment LibriSpeech policy)
NUM_FREQ_MASKS = 2
TIME_MASK_FRAMES = 40  # frames, widest time mask (400 ms)
TIME_MASK_MAX_PROPORTION = 0.2  # of the padded length, so short clips are never blanked out
NUM_TIME_MASKS = 2


def count_frames(num_samples: torch.Tensor, config: FeatureConfig) -> torch.Tensor:
    """Samples per row [B] -> whole analysis frames per row [B] (0 when shorter than n_fft)."""
    frames = torch.div(num_samples - config.n_fft, config.hop_length, rounding_mode="floor") + 1
    return frames.clamp(min=0)  # [B]


def normalize_utterances(features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """features [B, T, F], lengths [B] frames -> zero mean, unit variance per row over its valid
    frames only; padded frames come back as zeros."""
    mask = torch.arange(features.shape[1], device=features.device)[None] < lengths[:, None]
    mask = mask[..., None].to(features.dtype)  # [B, T, 1]
    count = lengths.clamp(min=1).to(features.dtype)[:, None, None]  # [B, 1, 1]
    mean = (features * mask).sum(dim=1, keepdim=True) / count  # [B, 1, F]
    centred = (features - mean) * mask  # [B, T, F]
    var = centred.square().sum(dim=1, keepdim=True) / count  # [B, 1, F]
    return centred * torch.rsqrt(var + NORM_EPS)  # [B, T, F]


class SpecAugment(nn.Module):
    """Frequency and time masks, drawn independently per row; a no-op in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        freq = [
            torchaudio.transforms.FrequencyMasking(FREQ_MASK_BINS, iid_masks=True)
            for _ in range(NUM_FREQ_MASKS)
        ]
        time = [
            torchaudio.transforms.TimeMasking(
                TIME_MASK_FRAMES, iid_masks=True, p=TIME_MASK_MAX_PROPORTION
            )
            for _ in range(NUM_TIME_MASKS)
        ]
        self.masks = nn.Sequential(*freq, *time)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, T, F] (normalised, so 0 is the mean) -> masked features [B, T, F]."""
        if not self.training:
            return features
        spec = features.transpose(1, 2)[:, None]  # [B, 1, F, T]
        spec = self.masks(spec)  # [B, 1, F, T]
        return spec[:, 0].transpose(1, 2)  # [B, T, F]


class LogMelFrontend(nn.Module):
    """Waveforms [B, T_wav] at 16 kHz -> normalised log-mel features [B, T, F] in float32."""

    def __init__(self, config: FeatureConfig, spec_augment: bool = True) -> None:
        super().__init__()
        self.config = config
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=config.sample_rate,
            n_fft=config.n_fft,
            win_length=config.win_length,
            hop_length=config.hop_length,
            n_mels=config.n_mels,
            center=False,
            power=2.0,
        )
        self.spec_augment = SpecAugment() if spec_augment else nn.Identity()

    def forward(
        self, waveforms: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """waveforms [B, T_wav], lengths [B] samples -> (features [B, T, F], frame_lengths [B])."""
        lengths = lengths.to(waveforms.device)  # [B]
        short = self.config.n_fft - waveforms.shape[1]
        if short > 0:  # the STFT needs one whole window; such rows get 0 frames
            waveforms = nn.functional.pad(waveforms, (0, short))  # [B, n_fft]
        frame_lengths = count_frames(lengths, self.config)  # [B]
        # the log and the statistics lose too much in half precision
        with torch.autocast(device_type=waveforms.device.type, enabled=False):
            power = self.mel(waveforms.float())  # [B, F, T]
            logmel = power.clamp(min=LOG_FLOOR).log().transpose(1, 2)  # [B, T, F]
            features = normalize_utterances(logmel, frame_lengths)  # [B, T, F]
            features = self.spec_augment(features)  # [B, T, F]
        return features, frame_lengths
