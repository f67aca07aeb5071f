"""Cached outputs of an encoder's frozen front (Whisper's log-mel, convolutions and every layer
below the first trained one), computed once per utterance, so alignment and token-CTC steps pay
only for the trained part (and the LLM), not for the frozen Whisper.

One float16 `.npy` per utterance under `root/<front digest>/`, named by a hash of the audio file's
path, size, mtime and the clip limit: new weights or a rewritten file never read stale frames.
Augmentation is rendered into the audio files by `speechchat synth`, so frames are deterministic.

Dims: B rows, T_wav samples, T_f front frames, D front width.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from model.audio import load_audio_file
from model.encoders.base import AudioEncoder
from training.batches import pad_waveforms
from training.manifest import Utterance

log = logging.getLogger(__name__)

BATCH_SECONDS = 240.0  # s of audio per front batch (length-sorted, so little padding)


def front_digest(encoder: AudioEncoder) -> str:
    """A short hash of the frozen weights (as float16 bytes, so fp32 and fp16 copies agree) and
    of Whisper's search where it is not greedy (a `whisper_decoder` front hears what it finds)."""
    digest = hashlib.sha1()
    beams = encoder.config.asr_beams
    if beams != 1:  # greedy leaves the digest as it was, so greedy caches stay valid
        digest.update(f"asr_beams={beams}".encode())
    for name, param in sorted(encoder.named_parameters()):
        if not param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().to("cpu", torch.float16).numpy().tobytes())
    return digest.hexdigest()[:16]


class FrameCache:
    """Front frames of utterances on disk; `fill` computes the missing ones."""

    def __init__(self, root: str | Path, encoder: AudioEncoder, max_seconds: float) -> None:
        if not encoder.front_frozen:
            raise ValueError(
                f"a {encoder.config.kind} encoder with trained front layers cannot cache frames"
            )
        self.dir = Path(root) / front_digest(encoder)
        self.max_seconds = max_seconds

    def path(self, utt: Utterance) -> Path:
        stat = os.stat(utt.audio)
        key = f"{utt.audio}|{stat.st_size}|{stat.st_mtime_ns}|{self.max_seconds}"
        name = hashlib.sha1(key.encode()).hexdigest()[:24]
        return self.dir / name[:2] / f"{name}.npy"

    def load(self, utt: Utterance) -> torch.Tensor:
        """One utterance's frames [T_f, D] float32."""
        return torch.from_numpy(np.load(self.path(utt)).astype(np.float32))

    @torch.no_grad()
    def fill(self, encoder: AudioEncoder, utts: Sequence[Utterance], device: torch.device) -> int:
        """Compute and store the frames of utterances not cached yet; returns how many."""
        todo = sorted(
            {u.audio: u for u in utts if not self.path(u).is_file()}.values(),
            key=lambda u: u.duration or 0.0,
        )
        if not todo:
            return 0
        log.info("caching front frames of %d utterances in %s", len(todo), self.dir)
        encoder.eval()
        bar = tqdm(total=len(todo), desc="front frames", unit="utt")
        for batch in length_batches(todo, BATCH_SECONDS):
            wavs, lengths = pad_waveforms(
                [load_audio_file(u.audio, self.max_seconds) for u in batch]
            )
            frames, frame_lengths = encoder.front(wavs.to(device), lengths.to(device))
            frames = frames.to("cpu", torch.float16).numpy()  # [B, T_f, D]
            for row, utt in enumerate(batch):
                self.store(self.path(utt), frames[row, : int(frame_lengths[row])])
            bar.update(len(batch))
        bar.close()
        return len(todo)

    @staticmethod
    def store(path: Path, frames: np.ndarray) -> None:
        """Write atomically, so an interrupted fill never leaves a truncated file behind."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with tmp.open("wb") as f:
            np.save(f, frames)
        tmp.replace(path)


def cached_frames(
    root: str | Path,
    encoder: AudioEncoder,
    utts: Sequence[Utterance],
    max_seconds: float,
    rank: int,
) -> FrameCache:
    """A cache holding the front frames of every utterance, filled by rank 0 where missing (the
    other ranks of a `torchrun` job wait for it); the encoder is left in training mode."""
    cache = FrameCache(root, encoder, max_seconds)
    if rank == 0:
        cache.fill(encoder, utts, next(encoder.parameters()).device)
        encoder.train()
    if dist.is_initialized():
        dist.barrier()
    return cache


def length_batches(utts: Sequence[Utterance], seconds: float) -> list[list[Utterance]]:
    """Consecutive groups whose padded length (rows x longest clip) stays under `seconds`."""
    batches: list[list[Utterance]] = []
    current: list[Utterance] = []
    for utt in utts:
        longest = max([utt.duration or 0.0] + [u.duration or 0.0 for u in current])
        if current and longest * (len(current) + 1) > seconds:
            batches.append(current)
            current = []
        current.append(utt)
    if current:
        batches.append(current)
    return batches
