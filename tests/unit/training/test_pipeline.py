"""The whole training pipeline on a handful of synthesized sentences with tiny models:
synth -> respond -> align -> evaluate (and CTC pretraining -> align --init)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from training.align import align
from training.config import AlignConfig, CTCConfig, SynthConfig
from training.corpus import Sentence, write_sentences
from training.ctc import pretrain_ctc
from training.evaluate import evaluate
from training.manifest import read_manifest, write_manifest
from training.responses import respond_manifest
from training.synth import synthesize_corpus

SENTENCES = [
    ("p1", "What is the capital of France?", "train"),
    ("p2", "Tell me a joke about cats.", "train"),
    ("p3", "How do airplanes stay in the air?", "train"),
    ("p4", "Name three primary colours.", "train"),
    ("p5", "Why is the sky blue?", "dev"),
    ("p6", "Give me a recipe for pancakes.", "dev"),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, tiny_llm_dir: Path) -> Path:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (make test installs it)")
    root = tmp_path_factory.mktemp("pipeline")
    write_sentences(
        root / "s.jsonl", [Sentence(i, t, "test", "question", s) for i, t, s in SENTENCES]
    )
    config = SynthConfig(
        train_voices=("espeak:en-us",),
        dev_voices=("espeak:en-us+f2",),
        eval_voices=("espeak:en-gb",),
    )
    report = synthesize_corpus(root / "s.jsonl", root / "out", workers=1, config=config)
    assert report.failed == 0
    for split in ("train", "dev"):
        respond_manifest(root / "out" / f"{split}.jsonl", llm=str(tiny_llm_dir), max_new_tokens=12)
    dev = read_manifest(root / "out" / "dev.jsonl")
    for utt in dev:  # spoken-QA lines: the accepted answers, `|`-separated
        utt.extra["answer"] = "blue|sky"
    write_manifest(root / "out" / "dev.jsonl", dev)
    return root / "out"


def tiny_conformer_align(tiny_llm_dir: Path, **changes) -> AlignConfig:
    """Alignment of a tiny conformer to the tiny Llama: fast steps that visibly learn."""
    base = AlignConfig(
        llm=str(tiny_llm_dir),
        encoder_kind="conformer",
        encoder_preset="tiny",
        batch_size=4,
        lr=3e-3,
        warmup_steps=1,
        num_workers=0,
        max_response_tokens=12,
    )
    return base.replace(**changes)


def test_responses_are_added_to_every_line(corpus: Path):
    for split in ("train", "dev"):
        utts = read_manifest(corpus / f"{split}.jsonl")
        assert utts and all(u.response is not None and u.split == split for u in utts)


def test_align_reduces_loss_and_writes_a_loadable_checkpoint(
    corpus: Path, tiny_llm_dir, tiny_llm, tmp_path
):
    cfg = tiny_conformer_align(tiny_llm_dir, steps=12, eval_every=6, save_every=6)
    manifests = [corpus / "train.jsonl", corpus / "dev.jsonl"]
    out = align(cfg, manifests, tmp_path / "run")
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    assert [r["step"] for r in records if "dev_ce" in r] == [6, 12]
    assert (out / "loss.png").stat().st_size > 1000
    config = json.loads((out / "encoder" / "config.json").read_text())
    assert config["training"]["steps"] == 12 and config["llm"]["name"] == tiny_llm.name
    # resuming a finished run does no more steps
    align(cfg, manifests, tmp_path / "run")
    assert len((out / "log.jsonl").read_text().splitlines()) == 12

    summary = evaluate(
        corpus / "dev.jsonl",
        str(out / "encoder"),
        tmp_path / "eval",
        llm=str(tiny_llm_dir),
        split="dev",
    )
    for key in ("ppl text", "ppl end-to-end", "ppl cascade", "cascade WER", "QA acc text"):
        assert summary[key] >= 0 and summary[key] == summary[key]  # finite, not NaN
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "ppl end-to-end" in report and "Two-turn" in report
    # each spoken question's answers, per system, in the report and as JSON lines
    answers = [json.loads(line) for line in (tmp_path / "eval" / "answers.jsonl").open()]
    assert [a["id"] for a in answers] == [u.id for u in read_manifest(corpus / "dev.jsonl")]
    for a in answers:
        assert set(a["said"]) == set(a["hit"]) == {"text", "end-to-end", "cascade"}
        assert a["answer"] == "blue|sky" and all(isinstance(t, str) for t in a["said"].values())
    for system, key in (("text", "QA acc text"), ("end-to-end", "QA acc end-to-end")):
        assert summary[key] == sum(a["hit"][system] for a in answers) / len(answers)
    assert "## Spoken-QA answers" in report and "| Why is the sky blue? | blue\\|sky |" in report
    assert (tmp_path / "eval" / "perplexity.png").is_file()
    assert "- LLM: " in report and "torch.float32" in report
    # through the CLI, no two-turn conversations asked for: no such section; the LLM in bf16;
    # the cascade on plain tiny.en
    from model.cli import main

    argv = ["evaluate", "--manifest", str(corpus / "dev.jsonl"), "--encoder", str(out / "encoder")]
    argv += ["--out", str(tmp_path / "eval0"), "--llm", str(tiny_llm_dir), "--split", "dev"]
    assert main([*argv, "--two-turn", "0", "--dtype", "bfloat16", "--stock-cascade"]) == 0
    bare_report = (tmp_path / "eval0" / "report.md").read_text()
    assert "Two-turn" not in bare_report and "torch.bfloat16" in bare_report
    assert "cascade ASR: Whisper default, 1 beam(s)" in bare_report


def test_ctc_pretraining_then_align_from_it(corpus: Path, tiny_llm_dir, tmp_path):
    ctc = CTCConfig(
        llm=str(tiny_llm_dir),
        encoder_preset="tiny",
        steps=4,
        batch_size=4,
        eval_every=4,
        num_workers=0,
    )
    manifests = [corpus / "train.jsonl", corpus / "dev.jsonl"]
    encoder_dir = pretrain_ctc(ctc, manifests, tmp_path / "ctc")
    record = json.loads((tmp_path / "ctc" / "log.jsonl").read_text().splitlines()[-1])
    assert 0.0 <= record["dev_wer"] and record["loss"] > 0
    cfg = AlignConfig(
        llm=str(tiny_llm_dir),
        encoder_kind="conformer",
        init=str(encoder_dir),
        steps=2,
        batch_size=4,
        warmup_steps=1,
        num_workers=0,
        eval_every=2,
    )
    out = align(cfg, manifests, tmp_path / "aligned")
    assert (out / "encoder" / "encoder.safetensors").is_file()


def test_token_ctc_on_cached_whisper_frames_then_align_from_it(
    corpus: Path, tiny_llm_dir, tiny_llm, tmp_path
):
    frames = str(tmp_path / "frames")
    ctc = CTCConfig(
        llm=str(tiny_llm_dir),
        encoder_kind="whisper",
        encoder_overrides={"whisper_source": "tiny-random", "adapter_hidden": 32},
        steps=30,
        batch_size=4,
        lr=3e-3,
        eval_every=15,
        num_workers=0,
        frame_cache=frames,
    )
    manifests = [corpus / "train.jsonl", corpus / "dev.jsonl"]
    encoder_dir = pretrain_ctc(ctc, manifests, tmp_path / "ctc")
    records = [json.loads(x) for x in (tmp_path / "ctc" / "log.jsonl").read_text().splitlines()]
    ctc_losses = [r["ctc"] for r in records]
    assert len(ctc_losses) == 30 and sum(ctc_losses[-5:]) < 0.8 * sum(ctc_losses[:5])
    assert [r["step"] for r in records if "dev_wer" in r] == [15, 30]
    config = json.loads((encoder_dir / "config.json").read_text())
    assert config["training"]["ctc_target"] == "llm_tokens"
    assert config["encoder"]["kind"] == "whisper"
    n_cached = len(list(Path(frames).rglob("*.npy")))
    assert n_cached == len(read_manifest(manifests[0])) + len(read_manifest(manifests[1]))
    # a second run from the checkpoint starts where the first ended
    again = pretrain_ctc(
        dataclasses.replace(ctc, init=str(encoder_dir), steps=2, eval_every=2),
        manifests,
        tmp_path / "ctc2",
    )
    first = json.loads((tmp_path / "ctc2" / "log.jsonl").read_text().splitlines()[0])
    assert first["ctc"] < 0.8 * ctc_losses[0] and (again / "encoder.safetensors").is_file()

    cfg = AlignConfig(
        llm=str(tiny_llm_dir),
        encoder_kind="whisper",
        init=str(encoder_dir),
        frame_cache=frames,
        steps=2,
        batch_size=4,
        warmup_steps=1,
        num_workers=0,
        eval_every=2,
        max_response_tokens=8,
    )
    out = align(cfg, manifests, tmp_path / "aligned")
    record = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 2 and record["dev_ce"] > 0
    assert len(list(Path(frames).rglob("*.npy"))) == n_cached  # reused, not recomputed
    from model.checkpoint import load_encoder

    encoder, _, _ = load_encoder(out / "encoder", tiny_llm.identity, device="cpu")
    assert encoder.config.whisper_source == "tiny-random"


def test_spoken_qa_set_is_synthesized_with_eval_voices(tmp_path):
    from training.engines import voice_available
    from training.spoken_qa import synthesize_spoken_qa

    if not voice_available("flite:slt"):
        pytest.skip("flite's slt voice is not installed (make test installs it)")
    manifest = synthesize_spoken_qa(tmp_path, voices=("flite:slt",), limit=3)
    utts = read_manifest(manifest)
    assert len(utts) == 3 and all(u.split == "eval" and u.voice == "flite:slt" for u in utts)
    assert all(u.extra["answer"] and Path(u.audio).stat().st_size > 10_000 for u in utts)


def test_spoken_qa_in_dev_voices_is_a_dev_split_and_never_reserved(tmp_path):
    from training.engines import voice_available
    from training.spoken_qa import EVAL_VOICES, synthesize_spoken_qa

    if not voice_available("espeak:en-us+klatt2"):
        pytest.skip("espeak-ng is not installed (make test installs it)")
    manifest = synthesize_spoken_qa(tmp_path, voices=("espeak:en-us+klatt2",), limit=2, split="dev")
    utts = read_manifest(manifest)
    assert [u.id for u in utts] == ["qa000-espeak-en-us-klatt2", "qa001-espeak-en-us-klatt2"]
    assert all(u.split == "dev" and Path(u.audio).stat().st_size > 10_000 for u in utts)
    with pytest.raises(ValueError, match="reserved"):
        synthesize_spoken_qa(tmp_path, voices=(EVAL_VOICES[0],), limit=1, split="dev")


def test_init_from_a_whisper_checkpoint_keeps_whisper_frozen(tiny_llm, tiny_llm_dir, tmp_path):
    from model.checkpoint import save_encoder
    from model.config import EncoderConfig
    from model.encoders import build_encoder
    from training.align import build_encoder_for

    cfg = EncoderConfig(kind="whisper", whisper_source="tiny-random", llm_hidden=64)
    fresh = build_encoder(cfg)
    save_encoder(tmp_path / "enc", fresh, tiny_llm.identity)
    encoder = build_encoder_for(
        AlignConfig(llm=str(tiny_llm_dir), init=str(tmp_path / "enc")), tiny_llm
    )
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert trainable and len(trainable) < len(list(encoder.parameters()))


def test_align_fine_tunes_whisper_top_layers_on_cached_frames(
    corpus: Path, tiny_llm, tiny_llm_dir, tmp_path
):
    from model.checkpoint import load_encoder, save_encoder
    from model.config import EncoderConfig
    from model.encoders import build_encoder
    from training.align import build_encoder_for

    torch.manual_seed(0)
    cfg = EncoderConfig(kind="whisper", whisper_source="tiny-random", llm_hidden=64)
    save_encoder(tmp_path / "enc", build_encoder(cfg), tiny_llm.identity)  # adapter-only
    frames = tmp_path / "frames"
    align_cfg = AlignConfig(
        llm=str(tiny_llm_dir), init=str(tmp_path / "enc"), trainable_layers=1,
        whisper_lr_scale=0.5, frame_cache=str(frames), steps=3, batch_size=4, warmup_steps=1,
        num_workers=0, eval_every=3, max_response_tokens=8,
    )  # fmt: skip
    encoder = build_encoder_for(align_cfg, tiny_llm)
    groups = {g["lr_scale"]: g["params"] for g in encoder.lr_groups(0.5)}
    assert {id(p) for p in groups[0.5]} == {
        id(p) for p in encoder.whisper.parameters() if p.requires_grad
    }
    assert groups[0.5] and {id(p) for p in groups[1.0]} == {
        id(p) for p in encoder.adapter.parameters()
    }
    manifests = [corpus / "train.jsonl", corpus / "dev.jsonl"]
    out = align(align_cfg, manifests, tmp_path / "run")
    record = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 3 and record["dev_ce"] > 0
    state = torch.load(out / "train_state.pt", weights_only=False)
    assert sorted(g["lr_scale"] for g in state["optim"]["param_groups"]) == [0.5, 1.0]
    n_utts = len(read_manifest(manifests[0])) + len(read_manifest(manifests[1]))
    assert len(list(frames.rglob("*.npy"))) == n_utts  # frames below the trained layer
    tuned, _, _ = load_encoder(out / "encoder", tiny_llm.identity, device="cpu")
    assert tuned.config.trainable_layers == 1
    start = build_encoder(cfg)
    moved = tuned.whisper.layers[-1].fc1.weight - start.whisper.layers[-1].fc1.weight
    assert moved.abs().max() > 0  # the top layer trained (and was saved)
    assert torch.equal(tuned.whisper.layers[0].fc1.weight, start.whisper.layers[0].fc1.weight)
    # token CTC from it trains the same layer, on the same cached frames
    ctc = CTCConfig(
        llm=str(tiny_llm_dir), encoder_kind="whisper", init=str(out / "encoder"), steps=2,
        batch_size=4, eval_every=2, num_workers=0, frame_cache=str(frames),
        whisper_lr_scale=0.5,
    )  # fmt: skip
    ctc_dir = pretrain_ctc(ctc, manifests, tmp_path / "ctc")
    again, _, _ = load_encoder(ctc_dir, tiny_llm.identity, device="cpu")
    assert again.config.trainable_layers == 1
    assert not torch.equal(again.whisper.layers[-1].fc1.weight, tuned.whisper.layers[-1].fc1.weight)
    assert len(list(frames.rglob("*.npy"))) == n_utts


def test_align_trains_the_whisper_decoder_correction_on_cached_states(
    corpus: Path, tiny_llm, tiny_llm_dir, tmp_path
):
    from model.checkpoint import load_encoder

    frames = tmp_path / "states"
    cfg = AlignConfig(
        llm=str(tiny_llm_dir), encoder_kind="whisper_decoder", frame_cache=str(frames), steps=3,
        batch_size=4, lr=3e-3, warmup_steps=1, num_workers=0, eval_every=3,
        max_response_tokens=8, encoder_overrides={"adapter_hidden": 32}, anchor_weight=1.0,
    )  # fmt: skip
    manifests = [corpus / "train.jsonl", corpus / "dev.jsonl"]
    out = align(cfg, manifests, tmp_path / "run")
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    record = records[-1]
    assert record["step"] == 3 and record["dev_ce"] > 0
    anchors = [r["anchor"] for r in records if "anchor" in r]  # the correction's pull, logged
    assert len(anchors) == 3 and anchors[0] == 0.0 and anchors[-1] > 0  # zero until it moves
    n_utts = len(read_manifest(manifests[0])) + len(read_manifest(manifests[1]))
    cached = sorted(frames.rglob("*.npy"))
    assert len(cached) == n_utts  # Whisper's decoder states, one file per utterance
    assert all(np.load(f).shape[1] == 384 for f in cached)  # tiny.en's width, not frames
    tuned, _, _ = load_encoder(out / "encoder", tiny_llm, device="cpu")
    assert tuned.config.kind == "whisper_decoder"
    assert tuned.correction[-1].weight.abs().max() > 0  # zero at the start, trained since
    with pytest.raises(ValueError, match="needs no CTC"):
        pretrain_ctc(
            CTCConfig(llm=str(tiny_llm_dir), encoder_kind="whisper_decoder", steps=1,
                      batch_size=4, num_workers=0),
            manifests,
            tmp_path / "ctc",
        )  # fmt: skip


def test_align_with_token_ctc_beside_the_answers(corpus: Path, tiny_llm_dir, tmp_path):
    cfg = tiny_conformer_align(
        tiny_llm_dir, steps=5, eval_every=5, save_every=5, ctc_weight=1.0, ctc_min_count=1
    )
    manifests = [corpus / "train.jsonl", corpus / "dev.jsonl"]
    align(cfg, manifests, tmp_path / "run")
    align(cfg.replace(steps=12), manifests, tmp_path / "run")  # resumed: head and optimizer too
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").open()]
    assert [r["step"] for r in records] == list(range(1, 13))
    ctc = [r["ctc"] for r in records]
    assert all(c > 0 for c in ctc) and sum(ctc[-3:]) < sum(ctc[:3])
    assert all(r["loss"] > r["ce"] for r in records)  # the CTC term is in the loss trained on
    with pytest.raises(ValueError, match="ctc_weight"):
        align(cfg.replace(steps=14, ctc_weight=0.0), manifests, tmp_path / "run")


def test_align_with_fewer_utterances_than_a_batch_fails_clearly(
    corpus: Path, tiny_llm_dir, tmp_path
):
    """Four train lines and a batch of eight: the loader (last partial batch dropped) would
    yield nothing, and training would wait on it for ever."""
    cfg = tiny_conformer_align(tiny_llm_dir, steps=2, batch_size=8)
    with pytest.raises(ValueError, match="4 train utterances .* no full batch of 8"):
        align(cfg, [corpus / "train.jsonl"], tmp_path / "run")


@pytest.mark.slow
def test_init_default_starts_from_the_shipped_encoder(tmp_path):
    """`init: default` (as `evaluate --encoder default`): the shipped checkpoint's weights."""
    from model.checkpoint import SHIPPED_DIR, load_encoder
    from model.llm import load_llm
    from training.align import build_encoder_for

    llm = load_llm("default")
    encoder = build_encoder_for(AlignConfig(init="default"), llm)
    shipped, _, _ = load_encoder(SHIPPED_DIR, llm)
    got, expected = encoder.state_dict(), shipped.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k].cpu(), expected[k].cpu()) for k in expected)
