"""CTC pretraining before alignment (the paper pretrains its encoder on ASR too); two targets:

- conformer: characters, from the conformer's own head on its 40 ms frames;
- whisper: the frozen LLM's tokens, from the adapter's LLM-width outputs scored against the LLM's
  own input embeddings (a head that is dropped afterwards), so the adapter learns to put each
  spoken token near the embedding of the typed token before modal-invariance alignment.

After pretraining, alignment starts from the checkpoint (`align --init`). Reports greedy CTC WER
on the dev split. With `frame_cache`, a frozen Whisper's outputs are computed once and reused.

Dims: B rows, T frames, V classes (+ blank at 0).
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

from model.checkpoint import save_encoder
from model.config import encoder_preset
from model.encoders import build_encoder
from model.llm import LoadedLLM, load_llm
from training.align import autocast_for, build_encoder_for, out_of_time
from training.batches import pad_waveforms, read_input
from training.config import CTCConfig
from training.frame_cache import FrameCache, cached_frames
from training.manifest import Utterance, read_manifest
from training.plots import plot_curves
from training.token_ctc import BLANK, TokenTask

log = logging.getLogger(__name__)

ALPHABET = " abcdefghijklmnopqrstuvwxyz'"  # index + 1 is the class; 0 is the CTC blank


def normalize_transcript(text: str) -> str:
    """Lower case letters, apostrophes and single spaces: what the CTC head spells."""
    return " ".join(re.sub(r"[^a-z' ]+", " ", text.lower()).split())


def encode_chars(text: str) -> list[int]:
    return [ALPHABET.index(c) + 1 for c in normalize_transcript(text)]


class CharTask:
    """Characters from the conformer's own CTC head (the paper's ASR pretraining)."""

    name = "chars"

    def __init__(self) -> None:
        self.head = None  # the conformer carries its head

    def encode(self, text: str) -> list[int]:
        return encode_chars(text)

    def decode(self, ids: list[int]) -> str:
        return "".join(ALPHABET[c - 1] for c in ids)

    def log_probs(self, encoder, batch: dict, device: torch.device):
        return encoder.forward_ctc(batch["waveforms"].to(device), batch["lengths"].to(device))

    def penalty(self) -> torch.Tensor | float:
        return 0.0


class CTCDataset(Dataset):
    def __init__(
        self,
        utterances: list[Utterance],
        task,
        max_seconds: float,
        frames: FrameCache | None = None,
    ) -> None:
        pairs = [(u, task.encode(u.text)) for u in utterances]
        self.utterances = [u for u, ids in pairs if ids]
        self.targets = [ids for _, ids in pairs if ids]
        self.max_seconds = max_seconds
        self.frames = frames

    def __len__(self) -> int:
        return len(self.utterances)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, list[int], str]:
        utt = self.utterances[index]
        return read_input(utt, self.max_seconds, self.frames), self.targets[index], utt.text


def collate_ctc(items: list[tuple[torch.Tensor, list[int], str]]) -> dict:
    wavs, lengths = pad_waveforms([w for w, _, _ in items])  # [B, T_wav] or [B, T_f, D_f], [B]
    targets = torch.tensor([c for _, chars, _ in items for c in chars])  # [sum U]
    target_lengths = torch.tensor([len(chars) for _, chars, _ in items])  # [B]
    return {
        "waveforms": wavs,
        "lengths": lengths,
        "targets": targets,
        "target_lengths": target_lengths,
        "texts": [t for _, _, t in items],
    }


def ctc_step_loss(task, encoder, batch: dict, device: torch.device) -> torch.Tensor:
    log_probs, frames = task.log_probs(encoder, batch, device)  # [B, T, V], [B]
    return torch.nn.functional.ctc_loss(
        log_probs.transpose(0, 1),
        batch["targets"].to(device),
        frames,
        batch["target_lengths"].to(device),
        blank=BLANK,
        zero_infinity=True,
    )


def best_path(log_probs: torch.Tensor, length: int) -> list[int]:
    """Greedy CTC path of one row [T, V]: repeats merged, blanks dropped."""
    best = log_probs[:length].argmax(-1).tolist()  # [T]
    return [c for i, c in enumerate(best) if c != BLANK and (i == 0 or c != best[i - 1])]


@torch.no_grad()
def ctc_wer(task, encoder, loader: DataLoader, device: torch.device, max_batches: int) -> float:
    """Greedy CTC word error rate on (part of) a split."""
    encoder.eval()
    refs, hyps = [], []
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        log_probs, frames = task.log_probs(encoder, batch, device)
        hyps += [
            normalize_transcript(task.decode(best_path(log_probs[r], int(frames[r]))))
            for r in range(log_probs.shape[0])
        ]
        refs += [normalize_transcript(t) for t in batch["texts"]]
    encoder.train()
    return jiwer.wer(refs, [h or "-" for h in hyps])


def build_task_and_encoder(cfg: CTCConfig, llm: LoadedLLM, utts: list[Utterance]):
    """(task, encoder): chars on a fresh conformer, or LLM tokens on a Whisper encoder's adapter
    (fresh, or from `cfg.init`)."""
    if cfg.encoder_kind == "conformer":
        if cfg.init:
            raise ValueError("character CTC starts a fresh conformer; `init` is for whisper")
        enc_cfg = encoder_preset(
            cfg.encoder_preset,
            kind="conformer",
            llm_hidden=llm.hidden_size,
            ctc_vocab=len(ALPHABET) + 1,
            **cfg.encoder_overrides,
        )
        return CharTask(), build_encoder(enc_cfg)
    encoder = build_encoder_for(cfg, llm)
    if encoder.config.kind == "whisper_decoder":
        raise ValueError(
            "a whisper_decoder encoder starts from Whisper's own tokens and needs no CTC "
            "pretraining; align it directly"
        )
    texts = [u.text for u in utts if u.split in (None, "train")]
    return TokenTask(llm, texts, cfg.system_prompt, cfg.min_token_count), encoder


def pretrain_ctc(
    cfg: CTCConfig, manifests: list[str | Path], out: str | Path, device: str = "auto"
) -> Path:
    """CTC-pretrain an encoder (conformer: characters; whisper: LLM tokens against the LLM's
    embeddings); save a checkpoint for `align --init`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev_t = torch.device(device)
    torch.manual_seed(cfg.seed)
    llm = load_llm(cfg.llm, device="cpu")  # identity, width, tokenizer and embedding table
    utts = [u for m in manifests for u in read_manifest(m)]
    task, encoder = build_task_and_encoder(cfg, llm, utts)
    encoder = encoder.to(dev_t).train()
    frames = None
    if cfg.frame_cache:
        wanted = [u for u in utts if u.split in (None, "train", "dev")]
        frames = cached_frames(cfg.frame_cache, encoder, wanted, cfg.max_audio_seconds, rank=0)
    make = lambda splits, shuffle: DataLoader(  # noqa: E731
        CTCDataset([u for u in utts if u.split in splits], task, cfg.max_audio_seconds, frames),
        batch_size=cfg.batch_size,
        shuffle=shuffle,
        collate_fn=collate_ctc,
        num_workers=cfg.num_workers,
        drop_last=shuffle,
    )
    train, dev = make((None, "train"), True), make(("dev",), False)
    groups = encoder.lr_groups(cfg.whisper_lr_scale)  # Whisper's own layers slower
    if task.head is not None:
        task.head.to(dev_t)
        groups.append({"params": list(task.head.parameters()), "lr_scale": 1.0})
    params = [p for g in groups for p in g["params"]]
    optim = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    peaks = [cfg.lr * g["lr_scale"] for g in groups]
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, peaks, total_steps=cfg.steps, pct_start=0.1)
    log.info(
        "CTC pretraining (%s) of a %s encoder: %d train / %d dev utterances",
        task.name,
        encoder.config.kind,
        len(train.dataset),
        len(dev.dataset),
    )
    step, bar, started = 0, tqdm(total=cfg.steps, desc="pretrain-ctc"), time.perf_counter()
    while step < cfg.steps:
        for batch in train:
            with autocast_for(dev_t):
                ctc = ctc_step_loss(task, encoder, batch, dev_t)
                loss = ctc + task.penalty()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optim.step(), sched.step(), optim.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            bar.set_postfix(ctc=f"{float(ctc.detach()):.3f}")
            record = {"step": step, "loss": float(loss.detach()), "ctc": float(ctc.detach())}
            if step % cfg.eval_every == 0 or step == cfg.steps:
                record["dev_wer"] = ctc_wer(task, encoder, dev, dev_t, cfg.eval_batches)
                log.info(
                    "step %d CTC loss %.3f dev WER %.3f", step, record["ctc"], record["dev_wer"]
                )
            with (out / "log.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
            if step >= cfg.steps or out_of_time(started, cfg.max_minutes):
                break
        if out_of_time(started, cfg.max_minutes):
            log.info("stopping at step %d: %s min wall-clock limit reached", step, cfg.max_minutes)
            break
    bar.close()
    wer = ctc_wer(task, encoder, dev, dev_t, cfg.eval_batches)
    training = {
        "ctc_steps": step,
        "ctc_target": task.name,
        "ctc_dev_wer": wer,
        "recipe": cfg.to_dict(),
    }
    save_encoder(out / "encoder", encoder, llm.identity, training=training)
    plot_curves(out / "log.jsonl", out / "loss.png", f"CTC pretraining ({task.name})")
    log.info("CTC pretraining done: dev WER %.3f; checkpoint %s", wer, out / "encoder")
    return out / "encoder"
