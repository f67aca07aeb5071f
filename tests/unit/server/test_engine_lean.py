"""The lean decode step: fusing weights leaves the model's outputs alone, a step over arena rows
of different lengths, a packed prefill and the compiled one-row step give the transformers
forward's logits, other models are refused, and an idle arena shrinks to the next request."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from server import cpu_attention, engine_compiled
from server.engine_batch import ARENA_GROW, Arena, PackedPrefill
from server.engine_compiled import CompiledRowStep
from server.engine_lean import LeanDecode, lean_support
from server.engine_linear import PACK_PAD, DecodeLinear
from server.kv_cache import KVStore
from tests.tiny import TINY_LLAMA

VOCAB = 96
LENGTHS = (5, 9, 13)  # tokens per row; rows decode together at different positions


def tiny_model(**overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, **{**TINY_LLAMA, **overrides})
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def test_fused_weights_are_views_and_outputs_stay():
    model = tiny_model()
    ids = torch.randint(0, VOCAB, (2, 11))
    before = model(ids).logits  # [2, T, V]
    lean = LeanDecode(model, pack=False)  # the in-place fused layout (CUDA's)
    q_proj = model.model.layers[0].self_attn.q_proj
    fused = lean.layers[0].qkv.weight  # [(H + 2 Hkv) Dh, D]
    assert q_proj.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "overrides", [{}, {"num_key_value_heads": 4, "attention_bias": True, "mlp_bias": True}]
)
@pytest.mark.parametrize("pack", [True, False], ids=["onednn-packed", "fused-in-place"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kernel", [False, True], ids=["matmuls", "cpu-kernel"])
def test_step_over_rows_of_different_lengths_equals_forward(overrides, pack, dtype, kernel):
    model = tiny_model(**overrides).to(dtype)
    seqs = [torch.randint(0, VOCAB, (n,)) for n in LENGTHS]
    expected = torch.stack([model(s[None]).logits[0, -1] for s in seqs])  # [3, V]
    lean = LeanDecode(model, pack=pack)
    assert lean.packed == pack and lean.attention_kernel is None  # only the compiled step's
    if kernel:  # rows' attention and K/V writes in server/cpu_attention.py's kernel
        lean.attention_kernel = cpu_attention.load_kernel()
        if lean.attention_kernel is None:
            pytest.skip("the C++ kernel did not build here")
    arena = Arena.for_model(KVStore(1 << 30), model, max_rows=4)
    assert arena.ensure(len(seqs), max(LENGTHS))
    with torch.inference_mode():
        for row, seq in enumerate(seqs):  # each row's prefix alone: the one-row path
            for pos, token in enumerate(seq[:-1].tolist()):
                lean.step(arena, row, row + 1, [pos], [token])
        # the last tokens together: the batched path with a mask per row
        got = lean.step(arena, 0, 3, [n - 1 for n in LENGTHS], [int(s[-1]) for s in seqs])
    # bf16 keeps 8 mantissa bits; two layers of different summation orders move a logit by ~0.1
    rtol, atol = (1e-4, 1e-4) if dtype == torch.float32 else (5e-2, 0.2)
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)


def test_other_architectures_are_refused():
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=VOCAB, sliding_window=None, **TINY_LLAMA)
    model = MistralForCausalLM(cfg).eval()
    assert "mistral" in lean_support(model)
    with pytest.raises(ValueError, match="does not support"):
        LeanDecode(model)
    assert lean_support(tiny_model()) is None


@pytest.mark.parametrize(
    ("pack", "fused_ops", "kernels"),
    [(True, False, False), (False, False, False), (False, True, False), (True, False, True)],
    ids=["onednn-packed", "fused-in-place", "cuda-ops", "cpu-kernels"],
)
def test_packed_prefill_then_decode_equals_forward(pack, fused_ops, kernels):
    """Three prompts prefilled as one sequence (one of them continuing an earlier chunk in its
    row), then one decode step for all: the forward's logits at every stage. `fused_ops`: the
    one-kernel RMSNorm and joint q/k rotation that CUDA uses; `kernels`: server/cpu_attention.py's
    norms and SiLU-and-multiply in the prefill, everything but the projections in the step."""
    model = tiny_model()
    seqs = [torch.randint(0, VOCAB, (n + 1,)) for n in LENGTHS]  # the last token is decoded
    lean = LeanDecode(model, pack=pack)
    assert not lean.fused_ops  # CPU's default
    lean.fused_ops = fused_ops
    if kernels:
        lean.attention_kernel = cpu_attention.load_kernel()
        if lean.attention_kernel is None:
            pytest.skip("the C++ kernels did not build here")
    arena = Arena.for_model(KVStore(1 << 30), model, max_rows=4)
    assert arena.ensure(len(seqs), max(LENGTHS) + 1)
    embed = model.get_input_embeddings()
    with torch.inference_mode():
        first = PackedPrefill(arena)
        first.add(2, 0, 6)  # row 2's first chunk alone; no prompt ends here
        assert lean.prefill(arena, first, [embed(seqs[2][:6])], []).shape[0] == 0
        packed = PackedPrefill(arena)
        chunks = []
        for row, seq in enumerate(seqs):
            start = 6 if row == 2 else 0
            packed.add(row, start, len(seq) - 1 - start)
            chunks.append(embed(seq[start:-1]))  # [Q_i, D]
        prompt_logits = lean.prefill(arena, packed, chunks, [0, 1, 2])  # [3, V]
        step_logits = lean.step(arena, 0, 3, list(LENGTHS), [int(s[-1]) for s in seqs])
    for row, seq in enumerate(seqs):
        ref = model(seq[None]).logits[0]  # [T, V]
        torch.testing.assert_close(prompt_logits[row], ref[-2], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(step_logits[row], ref[-1], rtol=1e-4, atol=1e-4)


def test_an_idle_arena_shrinks_to_the_next_request():
    """After a long conversation, a short request on an idle engine does not inherit its length
    (every row it later adds would be that long), and the KV budget gets the bytes back."""
    store = KVStore(1 << 30)
    arena = Arena.for_model(store, tiny_model(), max_rows=4)
    assert arena.ensure(1, 1000) and arena.capacity == 1024
    long_bytes = store.used_bytes
    assert arena.ensure(2, 40)  # busy (not idle): grows rows, keeps length
    assert (arena.rows, arena.capacity) == (2, 1024)
    assert arena.ensure(1, 40, idle=True)
    assert (arena.rows, arena.capacity) == (1, ARENA_GROW)
    assert store.used_bytes == arena.nbytes < long_bytes


def test_a_busy_arena_grows_with_its_rows_and_an_idle_one_starts_afresh():
    """Growing under a row in use keeps what the rows hold; growing an idle arena (the next turn
    of a conversation that outgrew it) copies nothing: its rows are loaded anew."""
    store = KVStore(1 << 30)
    arena = Arena.for_model(store, tiny_model(), max_rows=4)
    assert arena.ensure(1, 100)
    arena.data.fill_(1.0)
    assert arena.ensure(1, 600)  # busy
    assert arena.capacity == 768 and float(arena.data[:, :, 0, :, :ARENA_GROW].min()) == 1.0
    assert float(arena.data[:, :, 0, :, ARENA_GROW:].abs().max()) == 0.0
    assert arena.ensure(1, 900, idle=True)
    assert arena.capacity == 1024 and float(arena.data.abs().max()) == 0.0
    assert store.used_bytes == arena.nbytes


@pytest.mark.parametrize(
    "overrides",
    [{}, {"num_key_value_heads": 4, "attention_bias": True, "mlp_bias": True}],
    ids=["gqa", "mha-biases"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kernel", [True, False], ids=["cpu-kernel", "sdpa"])
def test_compiled_one_row_step_equals_forward_without_recompiling(
    overrides, dtype, kernel, caplog, monkeypatch
):
    """Steps of one row at growing positions through the compiled pieces: the forward's logits
    at every position, and no graph compiled after the warm-up (weights are inputs, so one
    graph serves every layer and every position). Attention through the C++ kernel, or without
    it: SDPA, in bf16 for the first four positions only, then batched matmuls."""
    monkeypatch.setattr(engine_compiled, "BF16_MATMUL_KEYS", 4)
    model = tiny_model(**overrides).to(dtype)
    seq = torch.randint(0, VOCAB, (9,))
    expected = model(seq[None]).logits[0]  # [T, V]
    with caplog.at_level("WARNING"):
        lean = LeanDecode(model, compiled=True)
    assert lean.row_step is not None, caplog.text
    assert (lean.attention_kernel is not None) == (cpu_attention.load_kernel() is not None)
    if not kernel:
        lean.attention_kernel = None
    elif lean.attention_kernel is None:
        pytest.skip("the C++ kernel did not build here")
    arena = Arena.for_model(KVStore(1 << 30), model, max_rows=2)
    assert arena.ensure(2, len(seq))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        got = torch.cat([lean.step(arena, 1, 2, [p], [int(t)]) for p, t in enumerate(seq)])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    # bf16: the compiled projections sum in float32, the forward's in bf16; nine steps move
    # a logit by up to ~0.27 (0.23 with SDPA's attention instead of the batched matmuls)
    rtol, atol = (1e-4, 1e-4) if dtype == torch.float32 else (5e-2, 0.35)
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)


def test_a_failing_compile_falls_back_to_the_eager_step(monkeypatch, caplog):
    def refuse(self) -> float:
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(CompiledRowStep, "warm_up", refuse)
    model = tiny_model()
    with caplog.at_level("WARNING"):
        lean = LeanDecode(model, compiled=True)
    assert lean.row_step is None and "no C++ compiler" in caplog.text
    arena = Arena.for_model(KVStore(1 << 30), model, max_rows=1)
    assert arena.ensure(1, 1)
    with torch.inference_mode():
        got = lean.step(arena, 0, 1, [0], [7])
    torch.testing.assert_close(got[0], model(torch.tensor([[7]])).logits[0, -1])


@pytest.mark.parametrize("rows", [1, 5, 16])
def test_a_packed_weight_with_1024_multiple_rows_is_padded_and_exact(rows):
    torch.manual_seed(0)
    weight, bias = torch.randn(2048, 48), torch.randn(2048)
    linear = DecodeLinear(weight, bias, pack=True)
    assert linear.packed_bias is not None and linear.packed_bias.shape == (2048 + PACK_PAD,)
    x = torch.randn(rows, 48)
    got = linear(x)
    assert got.shape == (rows, 2048)
    torch.testing.assert_close(got, torch.nn.functional.linear(x, weight, bias))
