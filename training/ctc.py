"""Character-level CTC pretraining of the conformer encoder (the paper pretrains it on ASR too).

The CTC head reads the conformer's 40 ms frames; after pretraining, alignment starts from this
checkpoint (`align --init`). Reports greedy CTC WER on the dev split.

Dims: B rows, T frames, V characters (+ blank at 0).
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import jiwer
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from model.audio import load_audio_file
from model.checkpoint import save_encoder
from model.config import encoder_preset
from model.encoders import build_encoder
from model.llm import load_llm
from training.align import autocast_for, out_of_time
from training.batches import pad_waveforms
from training.config import CTCConfig
from training.manifest import Utterance, read_manifest
from training.plots import plot_curves

log = logging.getLogger(__name__)

ALPHABET = " abcdefghijklmnopqrstuvwxyz'"  # index + 1 is the class; 0 is the CTC blank
BLANK = 0


def normalize_transcript(text: str) -> str:
    """Lower case letters, apostrophes and single spaces: what the CTC head spells."""
    return " ".join(re.sub(r"[^a-z' ]+", " ", text.lower()).split())


def encode_chars(text: str) -> list[int]:
    return [ALPHABET.index(c) + 1 for c in normalize_transcript(text)]


def decode_greedy(log_probs: torch.Tensor, length: int) -> str:
    """Best path of one row [T, V]: merge repeats, drop blanks."""
    best = log_probs[:length].argmax(-1).tolist()  # [T]
    chars = [
        ALPHABET[c - 1] for i, c in enumerate(best) if c != BLANK and (i == 0 or c != best[i - 1])
    ]
    return " ".join("".join(chars).split())


class CTCDataset(Dataset):
    def __init__(self, utterances: list[Utterance], max_seconds: float) -> None:
        self.utterances = [u for u in utterances if encode_chars(u.text)]
        self.max_seconds = max_seconds

    def __len__(self) -> int:
        return len(self.utterances)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, list[int], str]:
        utt = self.utterances[index]
        return load_audio_file(utt.audio, self.max_seconds), encode_chars(utt.text), utt.text


def collate_ctc(items: list[tuple[torch.Tensor, list[int], str]]) -> dict:
    wavs, lengths = pad_waveforms([w for w, _, _ in items])  # [B, T_wav], [B]
    targets = torch.tensor([c for _, chars, _ in items for c in chars])  # [sum U]
    target_lengths = torch.tensor([len(chars) for _, chars, _ in items])  # [B]
    return {
        "waveforms": wavs,
        "lengths": lengths,
        "targets": targets,
        "target_lengths": target_lengths,
        "texts": [t for _, _, t in items],
    }


def ctc_step_loss(encoder, batch: dict, device: torch.device) -> torch.Tensor:
    log_probs, frames = encoder.forward_ctc(
        batch["waveforms"].to(device), batch["lengths"].to(device)
    )
    return torch.nn.functional.ctc_loss(
        log_probs.transpose(0, 1),
        batch["targets"].to(device),
        frames,
        batch["target_lengths"].to(device),
        blank=BLANK,
        zero_infinity=True,
    )


@torch.no_grad()
def ctc_wer(encoder, loader: DataLoader, device: torch.device, max_batches: int) -> float:
    """Greedy CTC word error rate on (part of) a split."""
    encoder.eval()
    refs, hyps = [], []
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        log_probs, frames = encoder.forward_ctc(
            batch["waveforms"].to(device), batch["lengths"].to(device)
        )
        hyps += [decode_greedy(log_probs[r], int(frames[r])) for r in range(log_probs.shape[0])]
        refs += [normalize_transcript(t) for t in batch["texts"]]
    encoder.train()
    return jiwer.wer(refs, [h or "-" for h in hyps])


def pretrain_ctc(
    cfg: CTCConfig, manifests: list[str | Path], out: str | Path, device: str = "auto"
) -> Path:
    """Train the conformer with a character CTC head; save a checkpoint for `align --init`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(cfg.seed)
    llm = load_llm(cfg.llm, device="cpu")  # only its identity and width are needed
    enc_cfg = encoder_preset(
        cfg.encoder_preset,
        kind="conformer",
        llm_hidden=llm.hidden_size,
        ctc_vocab=len(ALPHABET) + 1,
        **cfg.encoder_overrides,
    )
    encoder = build_encoder(enc_cfg).to(device).train()
    utts = [u for m in manifests for u in read_manifest(m)]
    make = lambda split, shuffle: DataLoader(  # noqa: E731
        CTCDataset([u for u in utts if u.split == split], cfg.max_audio_seconds),
        batch_size=cfg.batch_size,
        shuffle=shuffle,
        collate_fn=collate_ctc,
        num_workers=cfg.num_workers,
        drop_last=shuffle,
    )
    train, dev = make("train", True), make("dev", False)
    optim = torch.optim.AdamW(encoder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    step, bar, started = 0, tqdm(total=cfg.steps, desc="pretrain-ctc"), time.perf_counter()
    while step < cfg.steps:
        for batch in train:
            with autocast_for(torch.device(device)):
                loss = ctc_step_loss(encoder, batch, torch.device(device))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(encoder.parameters(), cfg.grad_clip)
            optim.step(), sched.step(), optim.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            record = {"step": step, "loss": float(loss.detach())}
            if step % cfg.eval_every == 0 or step == cfg.steps:
                record["dev_wer"] = ctc_wer(encoder, dev, torch.device(device), cfg.eval_batches)
                log.info(
                    "step %d CTC loss %.3f dev WER %.3f", step, record["loss"], record["dev_wer"]
                )
            with (out / "log.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
            if step >= cfg.steps or out_of_time(started, cfg.max_minutes):
                break
        if out_of_time(started, cfg.max_minutes):
            log.info("stopping at step %d: %s min wall-clock limit reached", step, cfg.max_minutes)
            break
    bar.close()
    wer = ctc_wer(encoder, dev, torch.device(device), cfg.eval_batches)
    training = {"ctc_steps": step, "ctc_dev_wer": wer, "recipe": cfg.to_dict()}
    save_encoder(out / "encoder", encoder, llm.identity, training=training)
    plot_curves(out / "log.jsonl", out / "loss.png", "CTC pretraining")
    log.info("CTC pretraining done: dev WER %.3f; checkpoint %s", wer, out / "encoder")
    return out / "encoder"
