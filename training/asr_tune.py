"""Whisper's own ASR adapted to the corpus's voices with the transcripts the corpus already has.

A `whisper_decoder` encoder hears what Whisper transcribes: tiny.en mishears the robotic voices
(espeak-ng, flite) that make most of our speech, and no LLM-side training recovers a word it never
named. The paper pretrains its encoder on ASR before alignment; this is that step for this kind:
low-rank adapters (LoRA, `peft`) on every attention and MLP projection of Whisper's encoder and
decoder, trained with teacher-forced cross-entropy on the (audio, transcript) pairs of the
unpaired ASR data, Whisper's own weights frozen. The adapters (~2 MB) are saved in peft's format;
`model.asr.load_whisper_decoding(..., lora=DIR)` merges them, so decoding costs what it did.

Dims: B rows, F mel bins, T_mel 3000 frames (one 30 s window), L target tokens.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import jiwer
import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from tqdm import tqdm
from transformers import WhisperFeatureExtractor

from model.asr import WhisperASR, load_whisper_decoding
from model.audio import load_audio_file
from model.config import SAMPLE_RATE
from training.align import LOG_FILE, STATE_FILE, append_log, autocast_for, lr_at, out_of_time
from training.config import AsrTuneConfig
from training.evaluate import normalize_words
from training.manifest import Utterance, read_manifest
from training.plots import plot_curves

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"  # peft's adapter_config.json + adapter_model.safetensors
IGNORE = -100  # label of the prompt and padding positions


def target_ids(tokenizer, prompt: tuple[int, ...], end: int, text: str) -> list[int]:
    """Decoder sequence for one transcript: Whisper's prompt, the text's tokens, <|endoftext|>."""
    return [*prompt, *tokenizer.encode(" " + text.strip(), add_special_tokens=False).ids, end]


def collate(seqs: list[list[int]], prompt_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences -> (decoder inputs [B, L], labels [B, L]): labels are the next tokens,
    IGNORE inside the prompt and past each sequence's end."""
    width = max(len(s) for s in seqs) - 1
    inputs = torch.zeros(len(seqs), width, dtype=torch.long)  # [B, L]
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)  # [B, L]
    for row, seq in enumerate(seqs):
        seq_t = torch.tensor(seq)
        inputs[row, : len(seq) - 1] = seq_t[:-1]
        labels[row, prompt_len - 1 : len(seq) - 1] = seq_t[prompt_len:]
    return inputs, labels


def usable(utts: list[Utterance], splits: tuple, max_seconds: float) -> list[Utterance]:
    """Lines of `splits` with a transcript and audio no longer than one window."""
    keep = []
    for u in utts:
        if u.split in splits and u.text.strip():
            if u.duration is None or u.duration <= max_seconds:
                keep.append(u)
    return keep


def dev_wer(model, tokenizer, tokens, utts: list[Utterance], device: torch.device) -> float:
    """Greedy WER of `model` (adapters active) on `utts`, as `evaluate` scores the cascade."""
    asr = WhisperASR(model, tokenizer, tokens, device)
    hyps = asr.transcribe_batch([load_audio_file(u.audio) for u in utts])
    model.train()
    refs = [normalize_words(u.text) for u in utts]
    return jiwer.wer(refs, [normalize_words(h) or "-" for h in hyps])


def tune_asr(
    cfg: AsrTuneConfig, manifests: list[str | Path], out: str | Path, device: str = "auto"
) -> Path:
    """Train LoRA adapters on Whisper from the manifests' train lines, scoring greedy WER on
    their dev lines; resumable; returns `out/adapter` (load with `lora=`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev_t = torch.device(
        device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    torch.manual_seed(cfg.seed)
    model, tokenizer, tokens = load_whisper_decoding(cfg.whisper_source)
    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.targets),
    )
    peft_model = get_peft_model(model.float(), lora)
    whisper = peft_model.base_model.model.to(dev_t).train()  # the Whisper, adapters inside
    utts = [u for m in manifests for u in read_manifest(m)]
    train = usable(utts, (None, "train"), cfg.max_audio_seconds)
    dev = usable(utts, ("dev",), cfg.max_audio_seconds)[: cfg.dev_lines]
    if not train:
        raise ValueError("tune-asr: the manifests have no train lines with a transcript")
    params = [p for p in whisper.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # align's schedule (warm-up, cosine to a tenth), as a factor of the peak
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: lr_at(s, cfg) / cfg.lr)
    step = resume(out, peft_model, optim, sched)
    log.info(
        "tune-asr: LoRA r=%d on %s, %d trainable weights; %d train / %d dev lines",
        cfg.rank,
        ",".join(cfg.targets),
        sum(p.numel() for p in params),
        len(train),
        len(dev),
    )
    if step == 0 and dev:
        with peft_model.disable_adapter():
            before = dev_wer(whisper, tokenizer, tokens, dev, dev_t)
        append_log(out, {"step": 0, "dev_wer": before})
        log.info("dev WER before tuning: %.4f", before)
    extractor = WhisperFeatureExtractor(
        feature_size=whisper.config.num_mel_bins, sampling_rate=SAMPLE_RATE
    )
    order = random.Random(cfg.seed + step)
    prompt_len = len(tokens.prompt)
    bar, started = tqdm(total=cfg.steps, initial=step, desc="tune-asr"), time.perf_counter()
    while step < cfg.steps and not out_of_time(started, cfg.max_minutes):
        batch = order.sample(train, min(cfg.batch_size, len(train)))
        mel = features_of(extractor, batch).to(dev_t)  # [B, F, T_mel]
        seqs = [target_ids(tokenizer, tokens.prompt, tokens.end, u.text) for u in batch]
        inputs, labels = collate(seqs, prompt_len)  # [B, L] each
        with autocast_for(dev_t):
            logits = whisper(input_features=mel, decoder_input_ids=inputs.to(dev_t)).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), labels.to(dev_t).flatten(), ignore_index=IGNORE
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optim.step(), sched.step(), optim.zero_grad(set_to_none=True)
        step += 1
        value = float(loss.detach())
        bar.update(1)
        bar.set_postfix(loss=f"{value:.3f}")
        record = {"step": step, "loss": value, "lr": sched.get_last_lr()[0]}
        if dev and (step % cfg.eval_every == 0 or step == cfg.steps):
            record["dev_wer"] = dev_wer(whisper, tokenizer, tokens, dev, dev_t)
            log.info("step %d loss %.3f dev WER %.4f", step, record["loss"], record["dev_wer"])
        append_log(out, record)
        if step % cfg.save_every == 0 or step == cfg.steps:
            save(out, peft_model, optim, sched, step, cfg, len(train))
    bar.close()
    save(out, peft_model, optim, sched, step, cfg, len(train))
    plot_curves(out / LOG_FILE, out / "loss.png", "Whisper LoRA tuning")
    return out / ADAPTER_DIR


def features_of(extractor: WhisperFeatureExtractor, batch: list[Utterance]) -> torch.Tensor:
    """Whisper's log-mel over one 30 s window for each line [B, F, T_mel]."""
    arrays = [load_audio_file(u.audio).numpy() for u in batch]
    return extractor(arrays, sampling_rate=SAMPLE_RATE, return_tensors="pt")["input_features"]


def save(out: Path, peft_model, optim, sched, step: int, cfg: AsrTuneConfig, n_train: int):
    """The adapters in peft's format (with the run's record) and the state to resume from."""
    peft_model.save_pretrained(out / ADAPTER_DIR)
    (out / ADAPTER_DIR / "README.md").unlink(missing_ok=True)  # peft's blank model card
    record = {"recipe": cfg.to_dict(), "steps": step, "train_utterances": n_train}
    dev = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines() if line]
    record["dev_wer"] = {r["step"]: r["dev_wer"] for r in dev if "dev_wer" in r}
    (out / ADAPTER_DIR / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    state = {
        "step": step,
        "adapter": get_peft_model_state_dict(peft_model),
        "optim": optim.state_dict(),
        "sched": sched.state_dict(),
    }
    torch.save(state, out / STATE_FILE)


def resume(out: Path, peft_model, optim, sched) -> int:
    """Restore adapters, optimizer and schedule from an interrupted run in `out`; its step."""
    path = out / STATE_FILE
    if not path.is_file():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=False)
    set_peft_model_state_dict(peft_model, state["adapter"])
    optim.load_state_dict(state["optim"])
    sched.load_state_dict(state["sched"])
    log.info("resuming from step %d in %s", state["step"], out)
    return int(state["step"])
