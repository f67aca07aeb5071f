"""Whisper from CTranslate2 weights, and the `whisper` encoder kind on a tiny random Whisper."""

from __future__ import annotations

import math
import struct
import time
from pathlib import Path

import pytest
import torch
from transformers import WhisperFeatureExtractor

from model.config import SAMPLE_RATE, EncoderConfig
from model.encoders.whisper import WhisperAudioEncoder, WhisperLogMel
from model.errors import CheckpointFormatError
from model.whisper_ct2 import (
    build_model_from_state,
    build_whisper_config,
    default_ct2_dir,
    load_whisper,
    map_ct2_to_hf,
    read_ct2_variables,
    verify_ct2_whisper,
)

CT2_IDS = {torch.float32: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.float16: 4}
CT2_IDS[torch.bfloat16] = 5
LLM_HIDDEN = 48
ADAPTER_HIDDEN = 32


def pack_string(text: str) -> bytes:
    data = text.encode() + b"\0"
    return struct.pack("<H", len(data)) + data


def write_ct2(
    path: Path, variables: dict[str, torch.Tensor], aliases: dict[str, str], version: int = 6
) -> None:
    """CTranslate2's model.bin layout, written independently of the reader under test."""
    out = [
        struct.pack("<I", version),
        pack_string("WhisperSpec"),
        struct.pack("<II", 3, len(variables)),
    ]
    for name, tensor in variables.items():
        raw = tensor.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
        out += [pack_string(name), struct.pack("<B", tensor.dim())]
        out += [struct.pack(f"<{tensor.dim()}I", *tensor.shape)]
        out += [struct.pack("<BI", CT2_IDS[tensor.dtype], len(raw)), raw]
    out.append(struct.pack("<I", len(aliases)))
    out += [pack_string(a) + pack_string(t) for a, t in aliases.items()]
    path.write_bytes(b"".join(out))


def make_sine(seconds: float, freq: float = 440.0, amp: float = 0.3) -> torch.Tensor:
    t = torch.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    chirp = torch.sin(2 * math.pi * (freq + 300 * t) * t)  # a rising tone, so frames differ
    return amp * chirp * (1 + 0.5 * torch.sin(2 * math.pi * 3 * t))  # [T_wav]


def to_ct2(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """HF Whisper -> CT2 variable names (the inverse of the mapping under test), fusing q/k/v."""
    sd = model.state_dict()
    ct2: dict[str, torch.Tensor] = {"encoder/num_heads": torch.tensor(2, dtype=torch.int16)}
    for side in ("encoder", "decoder"):
        p = f"model.{side}"
        ct2[f"{side}/position_encodings/encodings"] = sd[f"{p}.embed_positions.weight"]
        ct2[f"{side}/layer_norm/gamma"] = sd[f"{p}.layer_norm.weight"]
        ct2[f"{side}/layer_norm/beta"] = sd[f"{p}.layer_norm.bias"]
        for i in range(model.config.encoder_layers):
            hf, c = f"{p}.layers.{i}.", f"{side}/layer_{i}/"
            zeros = torch.zeros_like(sd[hf + "self_attn.q_proj.bias"])
            ct2[c + "self_attention/linear_0/weight"] = torch.cat(
                [sd[hf + f"self_attn.{x}_proj.weight"] for x in "qkv"]
            )
            ct2[c + "self_attention/linear_0/bias"] = torch.cat(
                [sd[hf + "self_attn.q_proj.bias"], zeros, sd[hf + "self_attn.v_proj.bias"]]
            )
            pairs = {"self_attention/linear_1": "self_attn.out_proj", "ffn/linear_0": "fc1"}
            pairs |= {"ffn/linear_1": "fc2", "self_attention/layer_norm": "self_attn_layer_norm"}
            pairs |= {"ffn/layer_norm": "final_layer_norm"}
            if side == "decoder":
                pairs |= {"attention/linear_0": "encoder_attn.q_proj"}
                pairs |= {"attention/linear_2": "encoder_attn.out_proj"}
                pairs |= {"attention/layer_norm": "encoder_attn_layer_norm"}
                ct2[c + "attention/linear_1/weight"] = torch.cat(
                    [sd[hf + f"encoder_attn.{x}_proj.weight"] for x in "kv"]
                )
                ct2[c + "attention/linear_1/bias"] = torch.cat(
                    [zeros, sd[hf + "encoder_attn.v_proj.bias"]]
                )
            for cname, hname in pairs.items():
                is_norm = cname.endswith("layer_norm")
                ct2[f"{c}{cname}/{'gamma' if is_norm else 'weight'}"] = sd[f"{hf}{hname}.weight"]
                ct2[f"{c}{cname}/{'beta' if is_norm else 'bias'}"] = sd[f"{hf}{hname}.bias"]
    for conv in ("conv1", "conv2"):
        ct2[f"encoder/{conv}/weight"] = sd[f"model.encoder.{conv}.weight"]
        ct2[f"encoder/{conv}/bias"] = sd[f"model.encoder.{conv}.bias"]
    ct2["decoder/embeddings/weight"] = sd["model.decoder.embed_tokens.weight"]
    return ct2


def tiny_encoder(trainable_layers: int = 0) -> WhisperAudioEncoder:
    cfg = EncoderConfig(
        kind="whisper",
        whisper_source="tiny-random",
        llm_hidden=LLM_HIDDEN,
        adapter_hidden=ADAPTER_HIDDEN,
        trainable_layers=trainable_layers,
    )
    return WhisperAudioEncoder(cfg)


def test_read_ct2_round_trips_names_shapes_dtypes_and_aliases(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    variables = {
        "encoder/conv1/weight": torch.randn(4, 3, 3, generator=gen).half(),
        "decoder/embeddings/weight": torch.randn(7, 5, generator=gen),
        "decoder/bf": torch.randn(6, generator=gen).bfloat16(),
        "decoder/ids": torch.arange(5, dtype=torch.int32),
        "decoder/activation": torch.tensor(3, dtype=torch.int8),
        "encoder/num_heads": torch.tensor(6, dtype=torch.int16),
    }
    path = tmp_path / "model.bin"
    write_ct2(path, variables, {"decoder/projection/weight": "decoder/embeddings/weight"})
    read = read_ct2_variables(path)
    assert set(read) == {*variables, "decoder/projection/weight"}
    for name, tensor in variables.items():
        assert read[name].dtype == tensor.dtype, name
        assert read[name].shape == tensor.shape, name
        assert torch.equal(read[name], tensor), name
    assert read["decoder/projection/weight"] is read["decoder/embeddings/weight"]
    assert int(read["encoder/num_heads"]) == 6


def test_read_ct2_rejects_unknown_version(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    write_ct2(path, {"a": torch.zeros(2)}, {}, version=5)
    with pytest.raises(CheckpointFormatError, match="version 5"):
        read_ct2_variables(path)


def test_ct2_flags_the_hf_layout_cannot_express_are_rejected() -> None:
    heads = torch.tensor(6, dtype=torch.int16)
    ok = {"encoder/num_heads": heads, "decoder/activation": torch.tensor(3, dtype=torch.int8)}
    assert verify_ct2_whisper(ok) == 6
    relu = {**ok, "decoder/activation": torch.tensor(0, dtype=torch.int8)}
    with pytest.raises(CheckpointFormatError, match="decoder/activation"):
        verify_ct2_whisper(relu)
    with pytest.raises(CheckpointFormatError, match="decoder/num_heads"):
        verify_ct2_whisper({**ok, "decoder/num_heads": torch.tensor(4, dtype=torch.int16)})


def test_ct2_mapping_rebuilds_every_weight_of_a_whisper(tmp_path: Path) -> None:
    source, _ = load_whisper("tiny-random")
    path = tmp_path / "model.bin"
    write_ct2(path, to_ct2(source), {"decoder/projection/weight": "decoder/embeddings/weight"})
    state = map_ct2_to_hf(read_ct2_variables(path))
    config = build_whisper_config(state, num_heads=2)
    assert (config.d_model, config.encoder_layers, config.decoder_layers) == (64, 2, 2)
    assert (config.encoder_ffn_dim, config.vocab_size, config.num_mel_bins) == (128, 51864, 80)
    rebuilt = build_model_from_state(state, config)
    expected = source.state_dict()
    got = rebuilt.state_dict()
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    assert rebuilt.proj_out.weight is rebuilt.model.decoder.embed_tokens.weight


def test_log_mel_matches_whisper_feature_extractor() -> None:
    wav = make_sine(1.37)  # [T_wav]
    ref = WhisperFeatureExtractor()(wav.numpy(), sampling_rate=SAMPLE_RATE, return_tensors="pt")
    mel, mel_len = WhisperLogMel(80)(wav[None], torch.tensor([wav.shape[0]]))  # [1, 80, T_mel]
    n = int(mel_len[0])
    assert n == wav.shape[0] // 160
    torch.testing.assert_close(mel[0], ref["input_features"][0, :, :n], atol=1e-4, rtol=0)


def test_encoder_shapes_and_lengths() -> None:
    enc = tiny_encoder().eval()
    one_s, half_s = make_sine(1.0), make_sine(0.5)
    batch = torch.zeros(2, one_s.shape[0])
    batch[0], batch[1, : half_s.shape[0]] = one_s, half_s
    with torch.no_grad():
        emb, lengths = enc(batch, torch.tensor([one_s.shape[0], half_s.shape[0]]))
    # 1 s: 100 mel frames -> 50 Whisper frames -> 13 embeddings of 80 ms
    assert emb.shape == (2, 13, LLM_HIDDEN)
    assert lengths.tolist() == [13, 7]
    assert torch.isfinite(emb).all()


def test_clip_alone_equals_clip_in_padded_batch() -> None:
    enc = tiny_encoder().eval()
    short, long = make_sine(0.73, 300.0), make_sine(1.9, 500.0, amp=0.6)
    batch = torch.zeros(2, long.shape[0])
    batch[0, : short.shape[0]], batch[1] = short, long
    batch[0, short.shape[0] :] = 0.5  # garbage past the length must not leak in
    with torch.no_grad():
        alone, alone_len = enc(short[None], torch.tensor([short.shape[0]]))
        both, both_len = enc(batch, torch.tensor([short.shape[0], long.shape[0]]))
    assert both_len[0] == alone_len[0]
    torch.testing.assert_close(both[0, : int(alone_len[0])], alone[0], atol=1e-4, rtol=1e-4)


def test_clip_over_30s_is_encoded_in_windows() -> None:
    enc = tiny_encoder().eval()
    wav = make_sine(31.0)  # [T_wav]
    first = wav[: 30 * SAMPLE_RATE]
    with torch.no_grad():
        emb, lengths = enc(wav[None], torch.tensor([wav.shape[0]]))
        head, head_len = enc(first[None], torch.tensor([first.shape[0]]))
    # 30 s -> 1500 frames, +1 s -> 50 frames: ceil(1550 / 4) = 388 embeddings
    assert lengths.tolist() == [388] and emb.shape[1] == 388
    assert head_len.tolist() == [375]
    torch.testing.assert_close(emb[0, :375], head[0], atol=1e-5, rtol=1e-5)


def test_only_adapter_trains_with_zero_trainable_layers() -> None:
    enc = tiny_encoder(trainable_layers=0).train()
    trainable = {id(p) for p in enc.trainable_parameters()}
    assert trainable == {id(p) for p in enc.adapter.parameters()}
    assert not any(p.requires_grad for p in enc.whisper.parameters())
    assert enc.adapter.training
    assert not any(m.training for m in enc.whisper.modules())


def test_top_layer_and_final_norm_train_with_one_trainable_layer() -> None:
    enc = tiny_encoder(trainable_layers=1).train()
    whisper = enc.whisper
    assert all(p.requires_grad for p in whisper.layers[-1].parameters())
    assert all(p.requires_grad for p in whisper.layer_norm.parameters())
    assert not any(p.requires_grad for p in whisper.layers[0].parameters())
    assert not whisper.conv1.weight.requires_grad
    assert whisper.layers[-1].training and not whisper.layers[0].training
    assert not whisper.conv2.training
    enc.eval()
    assert not whisper.layers[-1].training


def test_trainable_layers_beyond_depth_is_rejected() -> None:
    with pytest.raises(ValueError, match="trainable_layers"):
        tiny_encoder(trainable_layers=3)


def test_gradient_reaches_adapter_and_top_layer_only() -> None:
    enc = tiny_encoder(trainable_layers=1).train()
    wav = torch.stack([make_sine(0.6), make_sine(0.6, 700.0)])  # [2, T_wav]
    emb, lengths = enc(wav, torch.tensor([wav.shape[1], wav.shape[1] - 800]))
    emb.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.adapter.parameters())
    assert enc.whisper.layers[-1].fc2.weight.grad.abs().sum() > 0
    assert enc.whisper.layers[0].fc2.weight.grad is None
    assert enc.whisper.conv1.weight.grad is None


@pytest.mark.slow
def test_default_loads_every_tiny_en_weight_from_ct2_and_caches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPEECHCHAT_CACHE", str(tmp_path))
    load_whisper("tiny-random")  # warm imports so the timings compare loading alone
    start = time.perf_counter()
    model, config = load_whisper("default")
    first = time.perf_counter() - start
    start = time.perf_counter()
    cached, _ = load_whisper("default")
    second = time.perf_counter() - start
    assert list((tmp_path / "whisper").glob("*.safetensors"))
    assert second < first, f"cached load {second:.3f}s not faster than first {first:.3f}s"
    dims = (config.d_model, config.encoder_layers, config.decoder_layers, config.encoder_ffn_dim)
    assert dims == (384, 4, 4, 1536)
    assert (config.encoder_attention_heads, config.num_mel_bins, config.vocab_size) == (
        6,
        80,
        51864,
    )
    assert (config.max_source_positions, config.max_target_positions) == (1500, 448)
    expected = map_ct2_to_hf(read_ct2_variables(default_ct2_dir() / "model.bin"))
    for weights in (model.state_dict(), cached.state_dict()):
        assert set(weights) == set(expected)
        for name, tensor in weights.items():
            assert torch.equal(tensor, expected[name].float()), f"{name} not from model.bin"
