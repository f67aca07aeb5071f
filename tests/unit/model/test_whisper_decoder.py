"""The `whisper_decoder` encoder kind: Whisper's decoder states as LLM embeddings (real tiny.en
and real speech where the words matter, the tiny random Whisper where only shapes do)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from model.asr import WhisperASR
from model.checkpoint import load_encoder, save_encoder
from model.config import EncoderConfig
from model.encoders import build_encoder
from model.encoders.base import lengths_to_mask
from model.encoders.whisper_decoder import WhisperDecoderEncoder, whisper_to_llm_pieces
from model.errors import CheckpointFormatError
from model.whisper_ct2 import default_ct2_dir
from training.batches import pad_waveforms

SENTENCE = "What is the capital of France?"


def config(llm, source: str = "default", **changes) -> EncoderConfig:
    return EncoderConfig(
        kind="whisper_decoder",
        whisper_source=source,
        llm_hidden=llm.hidden_size,
        adapter_hidden=32,
        **changes,
    )


@pytest.fixture(scope="module")
def encoder(tiny_llm) -> WhisperDecoderEncoder:
    torch.manual_seed(0)
    return build_encoder(config(tiny_llm), tiny_llm).eval()


@pytest.fixture(scope="module")
def question(speak) -> torch.Tensor:
    return speak(SENTENCE)


def test_whisper_tokens_map_to_the_llm_pieces_of_their_text(tiny_llm):
    whisper_tok = Tokenizer.from_file(str(default_ct2_dir() / "tokenizer.json"))
    end = whisper_tok.token_to_id("<|endoftext|>")
    pieces = whisper_to_llm_pieces(whisper_tok, tiny_llm, end)
    assert pieces.shape[0] == end
    for word in (" France", " capital", "What", " Mississippi"):
        (w,) = whisper_tok.encode(word, add_special_tokens=False).ids
        got = [int(i) for i in pieces[w] if i >= 0]
        assert got == tiny_llm.tokenizer(word, add_special_tokens=False)["input_ids"], word
    # a token that continues a word gets the LLM's continuation pieces, not a word start
    ids = whisper_tok.encode(" Tokyoite", add_special_tokens=False).ids
    tail = whisper_tok.decode([ids[-1]])
    assert not tail.startswith(" ")
    got = [int(i) for i in pieces[ids[-1]] if i >= 0]
    assert not tiny_llm.tokenizer.convert_ids_to_tokens(got)[0].startswith("Ġ")


def test_untrained_embeddings_spell_the_transcript_in_llm_tokens(
    encoder: WhisperDecoderEncoder, tiny_llm, question: torch.Tensor
):
    """Before any training each embedding is a mixture of LLM token embeddings led by Whisper's
    choice, so the nearest LLM tokens read back what Whisper heard."""
    asr = WhisperASR.from_source("default")
    heard = asr.transcribe(question)
    assert "capital" in heard.lower() and "france" in heard.lower()
    emb = encoder.encode_one(question)  # [L, D_llm]
    table = tiny_llm.model.get_input_embeddings().weight.float()  # [V_llm, D_llm]
    sims = (
        torch.nn.functional.normalize(emb, dim=-1) @ torch.nn.functional.normalize(table, dim=-1).T
    )
    read = tiny_llm.tokenizer.decode(sims.argmax(-1).tolist())
    assert "capital" in read and "France" in read, read
    whisper_ids = asr.tokenizer.encode(" " + heard, add_special_tokens=False).ids
    assert emb.shape[0] == len(whisper_ids)  # one embedding per emitted Whisper token


def test_batch_matches_one_by_one_and_silence_keeps_one_embedding(
    encoder: WhisperDecoderEncoder, question: torch.Tensor
):
    silence = torch.zeros(16000)
    wavs, lengths = pad_waveforms([question, silence])
    out, out_lengths = encoder(wavs, lengths)  # [2, L, D_llm]
    assert int(out_lengths[1]) >= 1
    for row, wav in enumerate((question, silence)):
        alone = encoder.encode_one(wav)
        assert alone.shape[0] == int(out_lengths[row])
        torch.testing.assert_close(out[row, : int(out_lengths[row])], alone, atol=1e-4, rtol=1e-4)
    assert out[1, int(out_lengths[1]) :].abs().sum() == 0  # padding stays zero
    frames, frame_lengths = encoder.front(wavs, lengths)
    again, _ = encoder(frames, frame_lengths, precomputed=True)
    torch.testing.assert_close(again, out)


def test_beam_search_encoder_gives_one_embedding_per_token_of_its_transcript(
    tiny_llm, question: torch.Tensor
):
    """With `asr_beams` the encoder hears what the beam search cascade hears, one embedding per
    Whisper token, batched as one by one."""
    torch.manual_seed(0)
    beam = build_encoder(config(tiny_llm, asr_beams=3), tiny_llm).eval()
    heard = WhisperASR.from_source("default", beams=3).transcribe(question)
    assert "capital" in heard.lower() and "france" in heard.lower()
    emb = beam.encode_one(question)  # [L, D_llm]
    tokenizer = Tokenizer.from_file(str(default_ct2_dir() / "tokenizer.json"))
    assert emb.shape[0] == len(tokenizer.encode(" " + heard, add_special_tokens=False).ids)
    wavs, lengths = pad_waveforms([question, torch.zeros(16000)])
    out, out_lengths = beam(wavs, lengths)  # [2, L, D_llm]
    torch.testing.assert_close(out[0, : int(out_lengths[0])], emb, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="asr_beams"):
        config(tiny_llm, asr_beams=0)


def test_only_the_correction_trains_and_reaches_the_checkpoint(tiny_llm, tmp_path: Path):
    torch.manual_seed(0)
    enc = build_encoder(config(tiny_llm, "tiny-random"), tiny_llm).train()
    assert enc.front_frozen and not enc.whisper.training
    trained = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trained == {"log_temperature"} | {
        f"correction.{n}" for n, _ in enc.correction.named_parameters()
    }
    wav, lengths = 0.1 * torch.randn(1, 8000), torch.tensor([8000])
    out, _ = enc(wav, lengths)
    out.sum().backward()
    assert enc.correction[-1].weight.grad.abs().sum() > 0
    assert enc.log_temperature.grad is not None
    assert all(p.grad is None for p in enc.whisper.parameters())
    with torch.no_grad():
        enc.correction[-1].bias.fill_(0.5)
    save_encoder(tmp_path / "enc", enc, tiny_llm.identity)
    assert (tmp_path / "enc" / "encoder.safetensors").stat().st_size < 200_000  # no Whisper
    again, _, _ = load_encoder(tmp_path / "enc", tiny_llm)
    torch.testing.assert_close(again(wav, lengths)[0], enc.eval()(wav, lengths)[0])
    with pytest.raises(CheckpointFormatError, match="loads with its LLM"):
        load_encoder(tmp_path / "enc", tiny_llm.identity)


def test_anchor_is_the_output_without_its_correction(tiny_llm):
    """The anchor (what training may be pulled back to) is the untrained output: equal to it at
    the start, and the output minus the correction once that has moved; it carries no gradient."""
    torch.manual_seed(0)
    enc = build_encoder(config(tiny_llm, "tiny-random"), tiny_llm).eval()
    wavs, lengths = pad_waveforms([0.1 * torch.randn(8000), 0.1 * torch.randn(4000)])
    frames, frame_lengths = enc.front(wavs, lengths)
    out, _ = enc(frames, frame_lengths, precomputed=True)  # [2, L, D_llm]
    torch.testing.assert_close(enc.anchor(frames, frame_lengths, precomputed=True), out)
    torch.testing.assert_close(enc.anchor(wavs, lengths), out)
    with torch.no_grad():
        enc.correction[-1].bias.fill_(0.5)
    moved, _ = enc(frames, frame_lengths, precomputed=True)
    anchor = enc.anchor(frames, frame_lengths, precomputed=True)
    assert not anchor.requires_grad
    valid = lengths_to_mask(frame_lengths, out.shape[1])  # [2, L]
    torch.testing.assert_close((moved - anchor)[valid], torch.full_like(moved[valid], 0.5))
    assert anchor[~valid].abs().sum() == 0 and moved[~valid].abs().sum() == 0


def test_the_anchor_pull_runs_whispers_front_once_on_waveforms(tiny_llm, monkeypatch):
    """Alignment on raw waveforms with `anchor_weight`: one Whisper decode feeds both the encoder
    and its anchor, and the loss equals the one from the same batch's precomputed frames."""
    from training.align import alignment_loss
    from training.batches import PromptFrame
    from training.config import AlignConfig

    torch.manual_seed(0)
    enc = build_encoder(config(tiny_llm, "tiny-random"), tiny_llm).train()
    with torch.no_grad():
        enc.correction[-1].bias.fill_(0.1)  # a correction that has moved
    wavs, lengths = pad_waveforms([0.1 * torch.randn(8000), 0.1 * torch.randn(6000)])
    answer = tiny_llm.tokenizer("Paris.", add_special_tokens=False)["input_ids"]
    batch = {"waveforms": wavs, "lengths": lengths, "texts": ["a", "b"], "responses": [answer] * 2}
    frame, cfg = PromptFrame.build(tiny_llm, None), AlignConfig(anchor_weight=1.0)
    frames, frame_lengths = enc.front(wavs, lengths)
    expected, stats = alignment_loss(
        tiny_llm, enc, frame, {**batch, "waveforms": frames, "lengths": frame_lengths}, cfg
    )
    calls = []
    front = enc.front
    monkeypatch.setattr(enc, "front", lambda *a: calls.append(1) or front(*a))
    got, got_stats = alignment_loss(tiny_llm, enc, frame, batch, cfg)
    assert len(calls) == 1
    assert stats["anchor"] > 0 and got_stats == stats
    torch.testing.assert_close(got, expected)


def test_scale_correction_moves_a_checkpoint_towards_its_start(tiny_llm, tiny_llm_dir, tmp_path):
    """`speechchat scale-correction` writes the encoder whose outputs lie `scale` of the way from
    the untrained mixture to the trained ones, and records the scale."""
    from model.cli import main

    torch.manual_seed(0)
    enc = build_encoder(config(tiny_llm, "tiny-random"), tiny_llm).eval()
    with torch.no_grad():
        for p in enc.correction.parameters():
            p.normal_(0.0, 0.5)  # a trained-looking correction
    save_encoder(tmp_path / "trained", enc, tiny_llm.identity, training={"steps": 3})
    argv = ["scale-correction", str(tmp_path / "trained"), "--scale", "0.25", "--llm"]
    assert main([*argv, str(tiny_llm_dir), "--out", str(tmp_path / "scaled")]) == 0
    scaled, _, record = load_encoder(tmp_path / "scaled", tiny_llm)
    assert record == {
        "steps": 3,
        "correction_scale": 0.25,
        "scaled_from": str(tmp_path / "trained"),
    }
    wav, lengths = 0.1 * torch.randn(1, 8000), torch.tensor([8000])
    start, trained = enc.anchor(wav, lengths), enc(wav, lengths)[0]
    assert (trained - start).abs().max() > 0.1
    torch.testing.assert_close(scaled(wav, lengths)[0], start + 0.25 * (trained - start))
    with pytest.raises(ValueError, match="fraction"):
        main([*argv[:3], "1.5", "--llm", str(tiny_llm_dir), "--out", str(tmp_path / "x")])
    # the same step sets Whisper's search, nothing else
    beams = ["--asr-beams", "3", "--out", str(tmp_path / "beams")]
    assert main([*argv[:3], "1", "--llm", str(tiny_llm_dir), *beams]) == 0
    searched, _, record = load_encoder(tmp_path / "beams", tiny_llm)
    assert searched.config.asr_beams == 3 and record["asr_beams"] == 3
    assert searched.config == dataclasses.replace(enc.config, asr_beams=3)
    torch.testing.assert_close(searched.correction[-1].weight, enc.correction[-1].weight)


def test_kind_rules(tiny_llm):
    with pytest.raises(ValueError, match="needs the loaded LLM"):
        build_encoder(config(tiny_llm, "tiny-random"))
    with pytest.raises(ValueError, match="keeps all of Whisper frozen"):
        config(tiny_llm, trainable_layers=1)
    with pytest.raises(ValueError, match="llm_hidden"):
        build_encoder(
            EncoderConfig(kind="whisper_decoder", whisper_source="tiny-random", llm_hidden=7),
            tiny_llm,
        )
