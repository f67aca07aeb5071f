"""`speechchat tune-asr`: LoRA adapters for Whisper trained on a manifest's own transcripts, and
a whisper_decoder checkpoint that carries them (tiny random Whisper, real espeak-ng speech)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from model.asr import WhisperASR, load_whisper_decoding
from model.checkpoint import LORA_DIR, load_encoder, save_encoder
from model.cli import main
from model.config import EncoderConfig
from model.encoders import build_encoder
from model.errors import CheckpointFormatError
from training.engines import voice_available
from training.frame_cache import front_digest
from training.manifest import Utterance, write_manifest

LINES = {
    "train": ("The cat sat on the mat.", "Open the window please.", "Where is the station?"),
    "dev": ("What time is it?",),
}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    from training.engines import synthesize_espeak

    if not voice_available("espeak:en-us"):
        pytest.skip("espeak-ng is not installed (make test installs it)")
    folder = tmp_path_factory.mktemp("asr_tune")
    utts = []
    for split, texts in LINES.items():
        for i, text in enumerate(texts):
            wav = folder / f"{split}{i}.wav"
            synthesize_espeak(text, "en-us", wav)
            utts.append(Utterance(id=wav.stem, audio=str(wav), text=text, split=split))
    return write_manifest(folder / "speech.jsonl", utts)


@pytest.fixture(scope="module")
def tuned(manifest, tmp_path_factory) -> Path:
    """A run folder after 8 steps of tune-asr on the tiny random Whisper."""
    out = tmp_path_factory.mktemp("tuned") / "run"
    argv = ["tune-asr", "--manifest", str(manifest), "--out", str(out), "--whisper"]
    argv += ["tiny-random", "--steps", "8", "--batch-size", "3", "--lr", "0.01", "--device", "cpu"]
    assert main(argv) == 0
    return out


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_tune_asr_lowers_the_transcripts_loss_and_resumes(tuned, manifest):
    records = read_log(tuned)
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert [r["step"] for r in records if "dev_wer" in r] == [0, 8]  # before, and at the end
    for name in ("adapter_config.json", "adapter_model.safetensors", "training.json"):
        assert (tuned / "adapter" / name).is_file()
    assert (tuned / "loss.png").stat().st_size > 0
    record = json.loads((tuned / "adapter" / "training.json").read_text())
    assert record["steps"] == 8 and record["train_utterances"] == 3
    # asking for more steps in the same folder carries on from step 8
    resumed = tuned.parent / "resumed"
    shutil.copytree(tuned, resumed)
    argv = ["tune-asr", "--manifest", str(manifest), "--out", str(resumed), "--whisper"]
    argv += ["tiny-random", "--steps", "10", "--batch-size", "3", "--lr", "0.01"]
    assert main(argv) == 0
    assert [r["step"] for r in read_log(resumed)][len(records) :] == [9, 10]


def test_the_adapters_merge_into_whisper_as_peft_runs_them(tuned):
    from peft import PeftModel

    merged, tokenizer, tokens = load_whisper_decoding("tiny-random", tuned / "adapter")
    stock, _, _ = load_whisper_decoding("tiny-random")
    unmerged = PeftModel.from_pretrained(load_whisper_decoding("tiny-random")[0], tuned / "adapter")
    mel = torch.randn(1, merged.config.num_mel_bins, 3000)
    ids = torch.tensor([tokens.prompt])
    with torch.no_grad():
        got = merged(input_features=mel, decoder_input_ids=ids).logits
        want = unmerged.eval()(input_features=mel, decoder_input_ids=ids).logits
        before = stock(input_features=mel, decoder_input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got - before).abs().max() > 1e-3  # the tuning moved it
    asr = WhisperASR.from_source("tiny-random", lora=str(tuned / "adapter"))
    assert isinstance(asr.transcribe(0.1 * torch.randn(8000)), str)
    with pytest.raises(CheckpointFormatError, match="no LoRA adapters"):
        load_whisper_decoding("tiny-random", tuned)  # the run folder, not its adapters


def test_a_checkpoint_carries_its_whisper_adapters(tuned, tiny_llm, tiny_llm_dir, tmp_path):
    """scale-correction --whisper-lora copies the adapters into the checkpoint, which then loads
    from anywhere with the adapted Whisper; frames cached for stock Whisper are not reused."""
    cfg = EncoderConfig(
        kind="whisper_decoder",
        whisper_source="tiny-random",
        llm_hidden=tiny_llm.hidden_size,
        adapter_hidden=32,
    )
    torch.manual_seed(0)
    enc = build_encoder(cfg, tiny_llm).eval()
    save_encoder(tmp_path / "plain", enc, tiny_llm.identity, training={"steps": 3})
    argv = ["scale-correction", str(tmp_path / "plain"), "--scale", "1", "--llm", str(tiny_llm_dir)]
    lora = ["--whisper-lora", str(tuned / "adapter"), "--out", str(tmp_path / "heard")]
    assert main([*argv, *lora]) == 0
    config = json.loads((tmp_path / "heard" / "config.json").read_text())
    assert config["encoder"]["whisper_lora"] == LORA_DIR
    assert config["training"]["whisper_lora"]["steps"] == 8
    moved = tmp_path / "elsewhere"
    shutil.move(tmp_path / "heard", moved)
    heard, _, _ = load_encoder(moved, tiny_llm)
    merged, _, _ = load_whisper_decoding("tiny-random", tuned / "adapter")
    for name, weight in merged.state_dict().items():
        torch.testing.assert_close(heard.whisper.state_dict()[name], weight, msg=name)
    torch.testing.assert_close(heard.correction[-1].weight, enc.correction[-1].weight)
    assert front_digest(heard) != front_digest(enc)
    # saved again (as align or scale-correction would), it keeps its own copy
    save_encoder(tmp_path / "again", heard, tiny_llm.identity)
    assert (tmp_path / "again" / LORA_DIR / "adapter_model.safetensors").is_file()
    with pytest.raises(ValueError, match="whisper_lora"):
        EncoderConfig(kind="whisper", whisper_lora=str(tuned / "adapter"))


def test_the_cascade_hears_with_the_encoders_whisper_unless_told_stock(tuned):
    from training.evaluate import cascade_asr

    cfg = EncoderConfig(
        kind="whisper_decoder",
        whisper_source="tiny-random",
        whisper_lora=str(tuned / "adapter"),
        asr_beams=2,
    )
    own, line = cascade_asr(cfg, "cpu", stock=False)
    merged, _, _ = load_whisper_decoding("tiny-random", tuned / "adapter")
    for name, weight in merged.state_dict().items():
        torch.testing.assert_close(own.model.state_dict()[name], weight, msg=name)
    assert own.beams == 2 and "LoRA" in line
    stock, line = cascade_asr(cfg, "cpu", stock=True)
    assert stock.beams == 2 and "LoRA" not in line and "default" in line
    assert stock.model.config.d_model == 384  # plain tiny.en, not the tiny random one
