"""CUDA graphs of the lean decode step: the static step (a fixed key range, masked per row)
equals the forward; the graph bookkeeping (one graph per rows and key block, all dropped when the
arena grows) holds on any device; on CUDA the captured replays equal the forward and the worker's
batched sessions equal `generate` token for token."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from model.speech_llm import SpeechLLM
from server import engine_fused
from server.engine_batch import Arena
from server.engine_fused import WARM_ROWS, FusedPieces
from server.engine_graphs import GraphedDecode
from server.engine_lean import LeanDecode
from server.kv_cache import KVStore
from tests.tiny import TINY_LLAMA
from tests.unit.server.test_worker import eight_batched_sessions_equal_generate, make_varied_llm

VOCAB = 96
LENGTHS = (5, 9, 13)  # tokens per row; rows decode together at different positions
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GQA_AND_MHA = pytest.mark.parametrize(
    "overrides",
    [{}, {"num_key_value_heads": 4, "attention_bias": True, "mlp_bias": True}],
    ids=["gqa", "mha-biases"],
)


def tiny_model(device: str = "cpu", dtype=torch.float32, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, **{**TINY_LLAMA, **overrides})
    return LlamaForCausalLM(config).to(device, dtype).eval().requires_grad_(False)


def forward_logits(model: LlamaForCausalLM, seqs: list[torch.Tensor]) -> torch.Tensor:
    """The forward's logits after each whole sequence -> [len(seqs), V]."""
    return torch.stack([model(s[None]).logits[0, -1] for s in seqs])


def decode_rows(lean: LeanDecode, arena: Arena, seqs: list[torch.Tensor]) -> torch.Tensor:
    """Each row's prefix one token at a time, alone; then the last tokens together -> [B, V]."""
    with torch.inference_mode():
        for row, seq in enumerate(seqs):
            for pos, token in enumerate(seq[:-1].tolist()):
                lean.step(arena, row, row + 1, [pos], [token])
        last = [int(s[-1]) for s in seqs]
        return lean.step(arena, 0, len(seqs), [len(s) - 1 for s in seqs], last)


@GQA_AND_MHA
def test_static_step_over_a_padded_key_range_equals_the_forward(overrides):
    model = tiny_model(**overrides)
    seqs = [torch.randint(0, VOCAB, (n,)) for n in LENGTHS]
    expected = forward_logits(model, seqs)  # [3, V]
    lean = LeanDecode(model, pack=False)
    lean.fused_ops = True  # CUDA's ops in the eager steps too (one row, then three)
    arena = Arena.for_model(KVStore(1 << 30), model, max_rows=4)
    assert arena.ensure(len(seqs), 300)
    eager = decode_rows(lean, arena, seqs)  # fills the rows' K/V (the static step rewrites it)
    torch.testing.assert_close(eager, expected, rtol=1e-4, atol=1e-4)
    ids = torch.tensor([int(s[-1]) for s in seqs])  # [3]
    pos = torch.tensor([len(s) - 1 for s in seqs])  # [3]
    for k_len in (13, 64, arena.capacity):  # the longest row's keys, and padding past them
        got = lean.static_step(arena, 0, 3, ids, pos, k_len)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@GQA_AND_MHA
@pytest.mark.parametrize("splits", [None, {"gate_up": 2, "down_proj": 4}], ids=["timed", "split-k"])
def test_fused_pieces_static_step_equals_the_forward(overrides, splits):
    """The compiled pieces (inductor on this CPU) in the static step: the same logits as the
    forward for one row, then three, over padded key ranges, with no compile after warm-up;
    also with the MLP's projections as split-K partial products (timed on CUDA only)."""
    model = tiny_model(**overrides)
    seqs = [torch.randint(0, VOCAB, (n,)) for n in LENGTHS]
    expected = forward_logits(model, seqs)  # [3, V]
    lean = LeanDecode(model, pack=False)
    fused = FusedPieces(lean, model.config, splits)
    assert fused.splits == (splits or {"gate_up": 1, "down_proj": 1})  # CPU: nothing timed
    assert fused.warm_up() > 0
    compiles = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    lean.fused = fused
    arena = Arena.for_model(KVStore(1 << 30), model, max_rows=4)
    assert arena.ensure(len(seqs), 300)
    with torch.inference_mode():
        for row, seq in enumerate(seqs):  # each prefix alone through the fused static step
            for pos, token in enumerate(seq[:-1].tolist()):
                one = torch.tensor([token]), torch.tensor([pos])
                lean.static_step(arena, row, row + 1, *one, 16)
        ids = torch.tensor([int(s[-1]) for s in seqs])  # [3]
        pos = torch.tensor([len(s) - 1 for s in seqs])  # [3]
        for k_len in (13, 64, arena.capacity):
            got = lean.static_step(arena, 0, 3, ids, pos, k_len)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        two = lean.static_step(arena, 1, 3, ids[1:], pos[1:], 16)  # a row count warmed up too
    torch.testing.assert_close(two, expected[1:], rtol=1e-4, atol=1e-4)
    assert len(seqs) in WARM_ROWS
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiles  # no recompile


def test_each_fused_pieces_compiles_apart():
    """Dynamo counts compiled entries per code object: two models' pieces under a limit of two
    entries (each needs one row and dynamic rows) still compile, neither falling back."""
    with torch._dynamo.config.patch(recompile_limit=2):
        for overrides in ({}, {"num_key_value_heads": 4}):
            model = tiny_model(**overrides)
            assert LeanDecode(model, pack=False).fused is None  # CPU: no graphs, no pieces
            FusedPieces(LeanDecode(model, pack=False), model.config).warm_up()


def test_one_graph_per_rows_and_key_block_and_a_new_arena_drops_them():
    """Bookkeeping without capture (replay runs the static step): one row decoding 24 tokens
    with blocks of 8 keys needs three graphs; growing the arena mid-way drops them."""
    model = tiny_model()
    seq = torch.randint(0, VOCAB, (24,))
    expected = model(seq[None]).logits[0]  # [T, V]
    lean = LeanDecode(model, pack=False)
    graphs = GraphedDecode(lean, block=8, capture=False)
    arena = Arena.for_model(KVStore(1 << 30), model, max_rows=2)
    assert arena.ensure(1, 20)
    got = []
    with torch.inference_mode():
        for pos, token in enumerate(seq.tolist()):
            if pos == 20:
                assert graphs.captured == 3 and len(graphs.graphs) == 3
                assert arena.ensure(2, 300)  # a new, longer tensor: old graphs point elsewhere
            got.append(graphs.step(arena, 0, 1, [pos], [token]))
    assert len(graphs.graphs) == 1 and graphs.captured == 4  # the block [16, 24) again
    assert set(graphs.graphs) == {(0, 1, 24)}
    torch.testing.assert_close(torch.cat(got), expected, rtol=1e-4, atol=1e-4)


@CUDA
@GQA_AND_MHA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("attention", [None, "flash"], ids=["timed", "flash"])
def test_cuda_graph_replays_equal_the_forward(overrides, dtype, attention):
    """Graphs (one row, then three) replay the forward's logits, attending as timing chose and
    with the split-keys kernel (server/engine_flashdecode.py) by name."""
    model = tiny_model("cuda", dtype, **overrides)
    seqs = [torch.randint(0, VOCAB, (n,), device="cuda") for n in LENGTHS]
    expected = forward_logits(model, seqs)  # [3, V]
    lean = LeanDecode(model, compiled=True)
    assert lean.graphs is not None and lean.row_step is None and lean.fused is not None
    if attention is not None:
        lean.fused = FusedPieces(lean, model.config, attention=attention)
        lean.fused.warm_up()
    arena = Arena.for_model(KVStore(1 << 30), model, max_rows=4)
    assert arena.ensure(len(seqs), max(LENGTHS))
    got = decode_rows(lean, arena, seqs)
    assert lean.graphs.failed is None
    assert lean.graphs.captured == 4  # rows 0, 1, 2 alone (one key block each), then all three
    torch.cuda.synchronize()
    rtol, atol = (1e-3, 1e-3) if dtype == torch.float32 else (5e-2, 0.2)
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)
    # replayed again (same keys): the same logits, no new capture
    again = decode_rows(lean, arena, seqs)
    assert lean.graphs.captured == 4
    torch.testing.assert_close(again, got)


@CUDA
def test_worker_on_cuda_graphs_equals_generate(tiny_llm):
    """Eight sessions of different lengths decode together from CUDA graphs, steps launched
    ahead: each answer is `generate`'s greedy one on the same model."""
    llm = make_varied_llm(tiny_llm.tokenizer)
    llm.model.to("cuda")
    worker = eight_batched_sessions_equal_generate(SpeechLLM(llm), decode_step="compiled")
    graphs = worker.engine.lean.graphs
    assert graphs is not None and graphs.failed is None and graphs.captured > 0
    assert worker.engine.chained > 0  # greedy rows: steps launched ahead on the device


def test_split_k_pieces_that_fail_to_compile_are_built_again_without_it(monkeypatch, caplog):
    """Timed splits whose graph cannot compile cost the split, not the fused pieces."""
    real_warm_up = FusedPieces.warm_up

    def warm_up(self) -> float:
        if any(split > 1 for split in self.splits.values()):
            raise RuntimeError("no lowering for split-K here")
        return real_warm_up(self)

    monkeypatch.setattr(engine_fused, "pick_split", lambda *_: 2)  # as a device might time it
    monkeypatch.setattr(FusedPieces, "warm_up", warm_up)
    model = tiny_model()
    with caplog.at_level("WARNING"):
        fused = LeanDecode(model, pack=False)._fused_pieces(model)
    assert fused is not None and fused.splits == {"gate_up": 1, "down_proj": 1}
    assert "again without split-K" in caplog.text


def test_unsplit_pieces_that_fail_to_compile_are_not_compiled_twice(monkeypatch):
    """Where nothing was split (no GPU timing chose it) a failed compile is not retried."""
    calls = []

    def warm_up(self) -> float:
        calls.append(dict(self.splits))
        raise RuntimeError("no Triton here")

    monkeypatch.setattr(FusedPieces, "warm_up", warm_up)
    model = tiny_model()
    assert LeanDecode(model, pack=False)._fused_pieces(model) is None
    assert calls == [{"gate_up": 1, "down_proj": 1}]
