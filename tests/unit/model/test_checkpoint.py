"""Encoder checkpoints: round trip, trainable-only weights, and the wrong-LLM error."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from model.checkpoint import load_encoder, read_config, save_encoder
from model.config import PromptConfig, encoder_preset
from model.encoders import build_encoder
from model.errors import CheckpointFormatError, CheckpointMismatchError


@pytest.fixture()
def encoder(tiny_llm):
    torch.manual_seed(0)
    return build_encoder(encoder_preset("tiny", llm_hidden=tiny_llm.hidden_size)).eval()


def test_round_trip_gives_identical_embeddings(tmp_path, encoder, tiny_llm):
    prompt = PromptConfig(system_prompt="Be brief.")
    save_encoder(tmp_path, encoder, tiny_llm.identity, prompt, {"steps": 3})
    loaded, loaded_prompt, training = load_encoder(tmp_path, tiny_llm)
    wav = torch.randn(16000) * 0.1  # [T_wav]
    torch.testing.assert_close(loaded.encode_one(wav), encoder.encode_one(wav))
    assert loaded_prompt == prompt and training == {"steps": 3}
    config = read_config(tmp_path)
    assert config["llm"]["name"] == tiny_llm.name
    assert config["encoder"]["kind"] == "conformer"


def test_frozen_weights_are_not_saved(tmp_path, encoder, tiny_llm):
    encoder.conformer.requires_grad_(False)
    save_encoder(tmp_path, encoder, tiny_llm.identity)
    from safetensors.torch import load_file

    saved = set(load_file(str(tmp_path / "encoder.safetensors")))
    frozen = {n for n, p in encoder.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert frozen and not saved & frozen
    assert trainable <= saved


@pytest.mark.parametrize(
    "change, reason",
    [
        (dict(name="Llama-2-7b-chat", embed_hash="0" * 16), "different embedding weights"),
        (dict(name="Llama-2-7b-chat", hidden_size=4096), "hidden 4096 vs 64"),
    ],
)
def test_loading_against_another_llm_names_both(tmp_path, encoder, tiny_llm, change, reason):
    save_encoder(tmp_path, encoder, replace(tiny_llm.identity, **change))
    with pytest.raises(CheckpointMismatchError) as err:
        load_encoder(tmp_path, tiny_llm)
    message = str(err.value)
    assert "Llama-2-7b-chat" in message and tiny_llm.name in message and reason in message


def test_not_a_checkpoint(tmp_path, tiny_llm):
    with pytest.raises(CheckpointFormatError, match="not an encoder checkpoint"):
        load_encoder(tmp_path, tiny_llm)
    (tmp_path / "config.json").write_text(json.dumps({"format_version": 99}))
    (tmp_path / "encoder.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointFormatError, match="unknown format"):
        load_encoder(tmp_path, tiny_llm)


def test_fine_tuned_whisper_layers_are_stored_in_float16_and_reload(tmp_path, tiny_llm):
    from safetensors.torch import load_file

    from model.config import EncoderConfig

    torch.manual_seed(0)
    cfg = EncoderConfig(
        kind="whisper", whisper_source="tiny-random", llm_hidden=tiny_llm.hidden_size,
        adapter_hidden=32, trainable_layers=1,
    )  # fmt: skip
    encoder = build_encoder(cfg).eval()
    with torch.no_grad():  # a fine-tuned top layer: not what `whisper_source` rebuilds
        encoder.whisper.layers[-1].fc1.weight.add_(0.05)
    save_encoder(tmp_path, encoder, tiny_llm.identity)
    saved = load_file(str(tmp_path / "encoder.safetensors"))
    assert saved["whisper.layers.1.fc1.weight"].dtype == torch.float16
    assert saved["adapter.proj.1.weight"].dtype == torch.float32
    assert "whisper.layers.0.fc1.weight" not in saved  # frozen: rebuilt from the source
    loaded, _, _ = load_encoder(tmp_path, tiny_llm)
    assert loaded.config.trainable_layers == 1
    torch.testing.assert_close(
        loaded.whisper.layers[-1].fc1.weight, encoder.whisper.layers[-1].fc1.weight.half().float()
    )
    wav = torch.randn(16000) * 0.1  # [T_wav]
    torch.testing.assert_close(
        loaded.encode_one(wav), encoder.encode_one(wav), atol=2e-3, rtol=2e-3
    )
