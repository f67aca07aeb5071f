"""The conformer encoder kind and its log-mel front-end: tiny preset, synthesized audio."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model.config import SAMPLE_RATE, FeatureConfig, encoder_preset
from model.encoders.base import build_encoder
from model.encoders.conformer import ConformerEncoder, apply_conformer_layer
from model.features import LogMelFrontend, normalize_utterances

LLM_HIDDEN = 48
TOLERANCE = 1e-5


@pytest.fixture(autouse=True)
def _one_thread_and_seed() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)


def synthesize_clip(seconds: float, seed: int = 0) -> torch.Tensor:
    """A voiced, speech-like signal: gliding f0 with harmonics, syllable envelope, breath noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    f0 = 120.0 + 30.0 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, np.pi))
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4.0 * t) ** 2
    wav = 0.2 * envelope * voiced + 0.01 * rng.standard_normal(t.shape)
    return torch.from_numpy(wav.astype(np.float32))


def pad_batch(clips: list[torch.Tensor], fill: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(c) for c in clips])
    batch = torch.full((len(clips), int(lengths.max())), fill)
    for row, clip in enumerate(clips):
        batch[row, : len(clip)] = clip
    return batch, lengths


def expected_embeddings(num_samples: int, subsampling: int = 4, stack: int = 2) -> int:
    """Independent arithmetic: 25 ms frames every 10 ms (no centring), unpadded k3 s2 convs;
    shorter clips are padded to the 2**(convs+1) - 1 frames one output frame needs."""
    convs = int(math.log2(subsampling))
    min_samples = 400 + (2 ** (convs + 1) - 2) * 160
    frames = 1 + (max(num_samples, min_samples) - 400) // 160
    for _ in range(convs):
        frames = (frames - 1) // 2
    return math.ceil(frames / stack)


@pytest.fixture
def tiny_encoder() -> ConformerEncoder:
    return ConformerEncoder(encoder_preset("tiny", llm_hidden=LLM_HIDDEN)).eval()


@pytest.mark.parametrize(
    "seconds", [[1.0], [0.3, 1.0], [2.5, 0.5, 1.7], [0.09, 4.0, 1.0, 0.2]], ids=str
)
def test_output_shapes_and_lengths(tiny_encoder: ConformerEncoder, seconds: list[float]) -> None:
    clips = [synthesize_clip(s, seed=i) for i, s in enumerate(seconds)]
    waveforms, lengths = pad_batch(clips)
    with torch.no_grad():
        emb, emb_lengths = tiny_encoder(waveforms, lengths)
    expected = [expected_embeddings(len(c)) for c in clips]
    assert emb_lengths.tolist() == expected
    assert emb.shape == (len(clips), max(expected), LLM_HIDDEN)
    assert torch.isfinite(emb).all()


def test_one_second_gives_80ms_embeddings(tiny_encoder: ConformerEncoder) -> None:
    emb = tiny_encoder.encode_one(synthesize_clip(1.0))
    assert emb.shape == (12, LLM_HIDDEN)  # 1 s / 80 ms = 12.5
    ten_s = tiny_encoder.encode_one(synthesize_clip(10.0))
    assert 124 <= ten_s.shape[0] <= 125


def test_tiny_clips_still_get_one_embedding(tiny_encoder: ConformerEncoder) -> None:
    waveforms, lengths = pad_batch([synthesize_clip(0.01), torch.zeros(0)])
    with torch.no_grad():
        emb, emb_lengths = tiny_encoder(waveforms, lengths)
    assert emb_lengths.tolist() == [1, 1]
    assert emb.shape == (2, 1, LLM_HIDDEN) and torch.isfinite(emb).all()


@pytest.mark.parametrize("subsampling, per_second", [(2, 25), (8, 6)])
def test_other_subsampling_factors(subsampling: int, per_second: int) -> None:
    cfg = encoder_preset("tiny", llm_hidden=LLM_HIDDEN, subsampling=subsampling)
    encoder = ConformerEncoder(cfg).eval()
    waveforms, lengths = pad_batch([synthesize_clip(1.0), synthesize_clip(2.0, seed=1)])
    with torch.no_grad():
        frames, frame_lengths = encoder.encode_frames(waveforms, lengths)
        emb, emb_lengths = encoder(waveforms, lengths)
    assert frames.shape[1] == int(frame_lengths.max())  # the convs and the arithmetic agree
    assert emb_lengths.tolist() == [expected_embeddings(n, subsampling) for n in lengths.tolist()]
    assert abs(int(emb_lengths[0]) - per_second) <= 1
    assert emb.shape == (2, int(emb_lengths.max()), LLM_HIDDEN)


def test_padding_invariance(tiny_encoder: ConformerEncoder) -> None:
    short, long = synthesize_clip(0.73, seed=3), synthesize_clip(2.1, seed=4)
    with torch.no_grad():
        alone = tiny_encoder.encode_one(short)  # [T, D_llm]
        # garbage past the row's length must not matter either
        batch, lengths = pad_batch([short, long], fill=0.5)
        emb, emb_lengths = tiny_encoder(batch, lengths)
    n = int(emb_lengths[0])
    assert n == alone.shape[0]
    torch.testing.assert_close(emb[0, :n], alone, atol=TOLERANCE, rtol=0)


def test_layer_runner_matches_torchaudio_without_padding(tiny_encoder: ConformerEncoder) -> None:
    x = torch.randn(3, 17, tiny_encoder.config.d_model)  # [B, T, D]
    with torch.no_grad():
        reference, _ = tiny_encoder.conformer(x, torch.full((3,), 17))
        h = x.transpose(0, 1)  # [T, B, D]
        for layer in tiny_encoder.conformer.conformer_layers:
            h = apply_conformer_layer(layer, h, torch.zeros(3, 17, dtype=torch.bool))
    torch.testing.assert_close(h.transpose(0, 1), reference, atol=TOLERANCE, rtol=0)


def test_normalisation_ignores_padding() -> None:
    valid = torch.randn(1, 30, 8) * 3 + 5  # [1, T, F]
    padded = torch.cat([valid, torch.full((1, 20, 8), 1e4)], dim=1)  # [1, T + 20, F]
    alone = normalize_utterances(valid, torch.tensor([30]))
    inside = normalize_utterances(padded, torch.tensor([30]))
    torch.testing.assert_close(inside[:, :30], alone, atol=TOLERANCE, rtol=0)
    assert inside[:, 30:].abs().max() == 0
    torch.testing.assert_close(alone.mean(dim=1), torch.zeros(1, 8), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        alone.std(dim=1, unbiased=False), torch.ones(1, 8), atol=1e-3, rtol=0
    )


def test_frontend_features_ignore_batch_padding() -> None:
    frontend = LogMelFrontend(FeatureConfig()).eval()
    short, long = synthesize_clip(0.6), synthesize_clip(1.5, seed=1)
    alone, alone_len = frontend(short[None], torch.tensor([len(short)]))
    batch, lengths = pad_batch([short, long])
    feats, feat_len = frontend(batch, lengths)
    assert feat_len.tolist() == [alone_len.item(), 1 + (len(long) - 400) // 160]
    assert feats.shape == (2, int(feat_len.max()), 80) and feats.dtype == torch.float32
    n = int(alone_len[0])
    torch.testing.assert_close(feats[0, :n], alone[0], atol=TOLERANCE, rtol=0)
    assert feats[0, n:].abs().max() == 0


def test_frontend_stays_float32_under_autocast() -> None:
    frontend = LogMelFrontend(FeatureConfig()).eval()
    wav = synthesize_clip(0.5)[None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats, _ = frontend(wav, torch.tensor([wav.shape[1]]))
    plain, _ = frontend(wav, torch.tensor([wav.shape[1]]))
    assert feats.dtype == torch.float32
    torch.testing.assert_close(feats, plain)


def test_spec_augment_only_in_train_mode() -> None:
    frontend = LogMelFrontend(FeatureConfig())
    waveforms, lengths = pad_batch([synthesize_clip(2.0, seed=i) for i in range(4)])
    frontend.eval()
    first, _ = frontend(waveforms, lengths)
    second, _ = frontend(waveforms, lengths)
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    frontend.train()
    masked, _ = frontend(waveforms, lengths)
    assert not torch.equal(masked, first)
    # every row got at least one whole mel bin masked to the mean (0)
    assert ((masked == 0).all(dim=1).any(dim=-1)).all()
    # masking only removes: unmasked entries are the eval features
    kept = masked != 0
    torch.testing.assert_close(masked[kept], first[kept], atol=0, rtol=0)
    plain = LogMelFrontend(FeatureConfig(), spec_augment=False).train()
    torch.testing.assert_close(plain(waveforms, lengths)[0], first, atol=0, rtol=0)


def test_ctc_head_shapes_and_finite_loss() -> None:
    encoder = ConformerEncoder(encoder_preset("tiny", llm_hidden=LLM_HIDDEN, ctc_vocab=12))
    waveforms, lengths = pad_batch([synthesize_clip(1.0), synthesize_clip(0.4, seed=1)])
    log_probs, out_lengths = encoder.forward_ctc(waveforms, lengths)
    assert log_probs.shape == (2, int(out_lengths.max()), 12) and log_probs.dtype == torch.float32
    assert out_lengths.tolist() == [23, 8]  # 40 ms frames
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(2, 23), atol=1e-5, rtol=0)
    targets = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])
    loss = torch.nn.functional.ctc_loss(
        log_probs.transpose(0, 1), targets, out_lengths, torch.tensor([4, 2])
    )
    assert torch.isfinite(loss)
    loss.backward()
    assert encoder.ctc_head is not None and encoder.ctc_head.weight.grad is not None


def test_ctc_training_reduces_loss() -> None:
    encoder = ConformerEncoder(encoder_preset("tiny", llm_hidden=LLM_HIDDEN, ctc_vocab=8))
    wav, lengths = synthesize_clip(0.5)[None], torch.tensor([8000])
    targets, target_lengths = torch.tensor([[3, 5, 2]]), torch.tensor([3])

    def measure_loss() -> torch.Tensor:
        log_probs, out_lengths = encoder.forward_ctc(wav, lengths)
        return torch.nn.functional.ctc_loss(
            log_probs.transpose(0, 1), targets, out_lengths, target_lengths
        )

    encoder.eval()
    with torch.no_grad():
        before = measure_loss().item()
    optimizer = torch.optim.Adam(encoder.parameters(), lr=3e-3)
    encoder.train()
    for _ in range(15):
        optimizer.zero_grad()
        measure_loss().backward()
        optimizer.step()
    encoder.eval()
    with torch.no_grad():
        after = measure_loss().item()
    assert after < 0.7 * before, (before, after)


def test_forward_ctc_needs_a_head(tiny_encoder: ConformerEncoder) -> None:
    with pytest.raises(ValueError, match="ctc_vocab"):
        tiny_encoder.forward_ctc(synthesize_clip(0.5)[None], torch.tensor([8000]))


def test_bad_input_shapes_raise(tiny_encoder: ConformerEncoder) -> None:
    with pytest.raises(ValueError, match="lengths"):
        tiny_encoder(torch.zeros(2, 8000), torch.tensor([8000]))


def test_build_encoder_returns_conformer() -> None:
    encoder = build_encoder(encoder_preset("tiny", llm_hidden=LLM_HIDDEN))
    assert isinstance(encoder, ConformerEncoder)
    assert len(encoder.trainable_parameters()) == len(list(encoder.parameters()))


def count_conformer_layer(d: int, ffn: int, kernel: int) -> int:
    layer_norm, linear = 2 * d, lambda i, o: i * o + o
    ffn_module = layer_norm + linear(d, ffn) + linear(ffn, d)
    attention = layer_norm + 4 * d * d + 4 * d
    conv = layer_norm + linear(d, 2 * d) + d * kernel + d + 2 * d + linear(d, d)
    return 2 * ffn_module + attention + conv + layer_norm


def test_paper_preset_parameter_count() -> None:
    cfg = encoder_preset("paper", llm_hidden=576)
    encoder = build_encoder(cfg)  # built (about a second) but never run
    total = sum(p.numel() for p in encoder.parameters())
    d = cfg.d_model
    subsampler = (9 * d + d) + (9 * d * d + d) + (d * 19 + 1) * d  # 80 mels -> 19 after two convs
    stacker = 2 * 2 * d + (2 * d * 576 + 576) + (576 * 576 + 576)
    layers = cfg.num_layers * count_conformer_layer(d, cfg.ffn_dim, cfg.kernel_size)
    assert total == subsampler + layers + stacker
    assert 70e6 < total < 90e6  # 80,874,624: tens of millions, as the paper's encoder
