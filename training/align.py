"""Modal-invariance alignment: train the encoder so the frozen LLM answers speech as it does text.

Loss: cross-entropy of the frozen LLM's own text-prompted response given the audio prompt (the
paper), optionally plus KL to the text-prompted LLM's next-token distributions (Ultravox-style),
token CTC of the transcript on the encoder's outputs (`ctc_weight`, training/token_ctc.py), and a
pull towards the encoder's untrained outputs (`anchor_weight`, `AudioEncoder.anchor`).
Logits are computed only at response positions. Resumable, DDP-aware (`torchrun`), bf16 autocast
on CUDA, loss curves written as a PNG.

Dims: B rows, T_wav samples, N response tokens in a batch, V vocabulary.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from model.checkpoint import load_encoder, resolve_encoder_path, save_encoder
from model.config import EncoderConfig, PromptConfig, encoder_preset
from model.encoders import build_encoder
from model.llm import LoadedLLM, load_llm
from training.batches import (
    AlignDataset,
    PromptFrame,
    collate_examples,
    encode_batch,
    pack_rows,
    response_logits,
    text_turns,
)
from training.config import AlignConfig, CTCConfig
from training.frame_cache import cached_frames
from training.manifest import read_manifest
from training.plots import plot_curves
from training.token_ctc import TokenTask, token_ctc_loss

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
LOG_FILE = "log.jsonl"


def alignment_loss(
    llm: LoadedLLM,
    encoder: torch.nn.Module,
    frame: PromptFrame,
    batch: dict,
    cfg: AlignConfig,
    ctc: TokenTask | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """CE (+ KL to the text-prompted teacher, + `ctc`'s token CTC, + the anchor's pull) on one
    collated batch."""
    device = llm.device
    if cfg.anchor_weight > 0:
        batch = front_once(encoder, batch, device)  # the encoder and its anchor read one front
    emb, emb_len = encode_batch(encoder, batch, device)  # [B, T, D], [B]
    turns = [emb[i, : int(emb_len[i])] for i in range(emb.shape[0])]
    packed = pack_rows(llm, turns, frame, batch["responses"])
    logits = response_logits(llm, packed)  # [N, V]
    if packed.targets.numel() == 0:  # every answer empty and cut: nothing to learn from
        return logits.sum() * 0.0, {"ce": 0.0}
    ce = torch.nn.functional.cross_entropy(logits, packed.targets)
    stats = {"ce": float(ce.detach())}
    loss = ce
    if ctc is not None and cfg.ctc_weight > 0:
        ctc_loss, stats["ctc"] = token_ctc_loss(ctc, emb, emb_len, batch["texts"])
        loss = loss + cfg.ctc_weight * ctc_loss
    if cfg.anchor_weight > 0:
        departure = anchor_departure(encoder, batch, emb, emb_len, device)
        if departure is not None:
            stats["anchor"] = float(departure.detach())
            loss = loss + cfg.anchor_weight * departure
    if cfg.kl_weight <= 0:
        return loss, stats
    with torch.no_grad():
        teacher = pack_rows(llm, text_turns(llm, frame, batch["texts"]), frame, batch["responses"])
        t_logits = response_logits(llm, teacher)  # [N, V]
    temp = cfg.kl_temperature
    kl = (
        torch.nn.functional.kl_div(
            (logits / temp).log_softmax(-1),
            (t_logits / temp).log_softmax(-1),
            log_target=True,
            reduction="batchmean",
        )
        * temp**2
    )
    stats["kl"] = float(kl.detach())
    return loss + cfg.kl_weight * kl, stats


def front_once(encoder: torch.nn.Module, batch: dict, device: torch.device) -> dict:
    """A batch of waveforms [B, T_wav] with its encoder's frozen front already run (frames
    [B, T_f, D_f] and their lengths); the batch as it is when it holds frames already or the
    front trains."""
    plain = getattr(encoder, "module", encoder)
    if batch["waveforms"].ndim == 3 or not plain.front_frozen:
        return batch
    frames, lengths = plain.front(batch["waveforms"].to(device), batch["lengths"].to(device))
    return {**batch, "waveforms": frames, "lengths": lengths}


def anchor_departure(
    encoder: torch.nn.Module,
    batch: dict,
    emb: torch.Tensor,
    emb_len: torch.Tensor,
    device: torch.device,
) -> torch.Tensor | None:
    """Mean squared distance of the outputs emb [B, T, D] from the encoder's untrained ones over
    the latter's mean squared norm (valid positions only); None for an encoder without an anchor."""
    inputs = batch["waveforms"].to(device)
    lengths = batch["lengths"].to(device)
    plain = getattr(encoder, "module", encoder)  # DDP's wrapped module: its anchor is no_grad
    anchor = plain.anchor(inputs, lengths, precomputed=inputs.ndim == 3)  # [B, T, D] or None
    if anchor is None:
        return None
    valid = torch.arange(emb.shape[1], device=device)[None] < emb_len[:, None]  # [B, T]
    moved = (emb.float() - anchor.float()).square().sum(-1)[valid]  # [valid positions]
    return moved.mean() / anchor.float().square().sum(-1)[valid].mean().clamp(min=1e-8)


def build_encoder_for(cfg: AlignConfig | CTCConfig, llm: LoadedLLM) -> torch.nn.Module:
    """A fresh encoder from the recipe, or the one in `cfg.init` (a checkpoint directory, e.g.
    CTC-pretrained, or "default": the shipped one); either way the encoder's own policy decides
    what trains (a Whisper encoder keeps its frozen part, `cfg.trainable_layers` may move it)."""
    if cfg.init:
        encoder, _, _ = load_encoder(resolve_encoder_path(cfg.init), llm, device="cpu")
    else:
        enc_cfg = encoder_preset(
            cfg.encoder_preset,
            kind=cfg.encoder_kind,
            llm_hidden=llm.hidden_size,
            **cfg.encoder_overrides,
        )
        encoder = build_encoder(enc_cfg, llm)
    if cfg.trainable_layers not in (None, encoder.config.trainable_layers):
        if not hasattr(encoder, "set_trainable_layers"):
            raise ValueError(f"trainable_layers is for whisper encoders, not {encoder.config.kind}")
        encoder.set_trainable_layers(cfg.trainable_layers)
    return encoder


def lr_at(step: int, cfg: AlignConfig) -> float:
    """Linear warm-up then cosine decay to 10% of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_loader(dataset: AlignDataset, cfg: AlignConfig, shuffle: bool, seed: int) -> DataLoader:
    sampler = (
        DistributedSampler(dataset, shuffle=shuffle, seed=seed) if dist.is_initialized() else None
    )
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=cfg.num_workers,
        collate_fn=collate_examples,
        drop_last=shuffle,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=cfg.num_workers > 0,
    )


@torch.no_grad()
def evaluate_loss(llm, encoder, frame, loader, cfg: AlignConfig, max_batches: int) -> float:
    """Mean response CE on (part of) the dev set."""
    encoder.eval()
    total, count = 0.0, 0
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        with autocast_for(llm.device):
            loss, _ = alignment_loss(llm, encoder, frame, batch, cfg.replace(kl_weight=0.0))
        total, count = total + float(loss), count + 1
    encoder.train()
    return total / max(1, count)


def autocast_for(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def setup_distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group under `torchrun`."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def align(
    cfg: AlignConfig, manifests: list[str | Path], out: str | Path, device: str = "auto"
) -> Path:
    """Train (or resume) an encoder on the manifests' train lines (dev lines for dev loss);
    the checkpoint lands in `out/encoder`, curves in `out/loss.png`."""
    out = Path(out)
    rank, world = setup_distributed()
    if device == "auto":
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    llm = load_llm(cfg.llm, device=device)
    frame = PromptFrame.build(llm, cfg.system_prompt)
    utts = [u for m in manifests for u in read_manifest(m)]
    train_utts = [u for u in utts if u.split in (None, "train")]
    dev_utts = [u for u in utts if u.split == "dev"]
    encoder = build_encoder_for(cfg, llm).to(llm.device).train()
    frames = (
        cached_frames(cfg.frame_cache, encoder, train_utts + dev_utts, cfg.max_audio_seconds, rank)
        if cfg.frame_cache
        else None
    )
    train = AlignDataset(
        train_utts, llm, cfg.max_response_tokens, cfg.max_audio_seconds, frames=frames
    )
    dev = AlignDataset(dev_utts, llm, cfg.max_response_tokens, cfg.max_audio_seconds, frames=frames)
    if len(train) < cfg.batch_size * world:  # the loader drops the last partial batch
        raise ValueError(
            f"{len(train)} train utterances with responses make no full batch of "
            f"{cfg.batch_size}{f' on each of {world} ranks' if world > 1 else ''}: lower "
            "--batch-size or add speech"
        )
    model = DistributedDataParallel(encoder) if dist.is_initialized() else encoder
    groups = encoder.lr_groups(cfg.whisper_lr_scale)  # Whisper's own layers slower
    ctc = None
    if cfg.ctc_weight > 0:  # its head (a blank and a scale) trains beside the encoder
        ctc = TokenTask(llm, [u.text for u in train_utts], cfg.system_prompt, cfg.ctc_min_count)
        ctc.head.to(llm.device)
        groups.append({"params": list(ctc.head.parameters()), "lr_scale": 1.0})
    params = [p for g in groups for p in g["params"]]
    optim = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = resume_state(out, encoder, optim, ctc)
    log.info(
        "aligning %s encoder: %d trainable params, %d train / %d dev utterances, from step %d",
        encoder.config.kind,
        sum(p.numel() for p in params),
        len(train),
        len(dev),
        step,
    )
    train_loader = make_loader(train, cfg, shuffle=True, seed=cfg.seed + step)
    dev_loader = make_loader(dev, cfg, shuffle=False, seed=0) if len(dev) else None
    bar = tqdm(total=cfg.steps, initial=step, desc="align", disable=rank != 0)
    started = time.perf_counter()
    while step < cfg.steps:
        for batch in train_loader:
            for group in optim.param_groups:
                group["lr"] = lr_at(step, cfg) * group.get("lr_scale", 1.0)  # older states: 1 group
            with autocast_for(llm.device):
                loss, stats = alignment_loss(llm, model, frame, batch, cfg, ctc)
            (loss / cfg.grad_accum).backward()
            if (step + 1) % cfg.grad_accum == 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                optim.step()
                optim.zero_grad(set_to_none=True)
            step += 1
            value = float(loss.detach())
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}")
            record = {"step": step, "loss": value, "lr": lr_at(step, cfg), **stats}
            if dev_loader is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
                record["dev_ce"] = evaluate_loss(
                    llm, encoder, frame, dev_loader, cfg, cfg.eval_batches
                )
                log.info("step %d dev CE %.3f", step, record["dev_ce"])
            if rank == 0:
                append_log(out, record | {"elapsed_s": time.perf_counter() - started})
                if step % cfg.save_every == 0 or step == cfg.steps:
                    save_state(out, encoder, optim, step, llm, cfg, len(train), ctc)
            if step >= cfg.steps or out_of_time(started, cfg.max_minutes):
                break
        if out_of_time(started, cfg.max_minutes):
            log.info("stopping at step %d: %s min wall-clock limit reached", step, cfg.max_minutes)
            if rank == 0:
                save_state(out, encoder, optim, step, llm, cfg, len(train), ctc)
            break
    bar.close()
    if rank == 0:
        plot_curves(out / LOG_FILE, out / "loss.png", "modal-invariance alignment")
    return out


def out_of_time(started: float, max_minutes: float | None) -> bool:
    return max_minutes is not None and time.perf_counter() - started > 60 * max_minutes


def append_log(out: Path, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / LOG_FILE).open("a") as f:
        f.write(json.dumps(record) + "\n")


def save_state(
    out, encoder, optim, step: int, llm: LoadedLLM, cfg: AlignConfig, n_train: int, ctc=None
):
    """The encoder checkpoint (DESIGN.md format) plus optimizer (and token-CTC head) state for
    resuming; the head is not part of the checkpoint."""
    training = {"recipe": cfg.to_dict(), "steps": step, "train_utterances": n_train}
    save_encoder(out / "encoder", encoder, llm.identity, PromptConfig(cfg.system_prompt), training)
    state = {"step": step, "optim": optim.state_dict(), "encoder": encoder.state_dict()}
    if ctc is not None:
        state["ctc_head"] = ctc.head.state_dict()
    torch.save(state, out / STATE_FILE)


def resume_state(
    out: Path, encoder: torch.nn.Module, optim: torch.optim.Optimizer, ctc: TokenTask | None = None
) -> int:
    """Restore encoder and optimizer from `out` if a run was interrupted; return its step."""
    path = out / STATE_FILE
    if not path.is_file():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=False)
    encoder.load_state_dict(state["encoder"])
    if (ctc is not None) != ("ctc_head" in state):
        raise ValueError(f"{out} was trained with a different ctc_weight (> 0 or not); resume it "
                         "with the same setting or start a new run folder")  # fmt: skip
    if ctc is not None:
        ctc.head.load_state_dict(state["ctc_head"])
    optim.load_state_dict(state["optim"])
    log.info("resuming from step %d in %s", state["step"], out)
    return int(state["step"])


__all__ = ["align", "alignment_loss", "EncoderConfig"]
