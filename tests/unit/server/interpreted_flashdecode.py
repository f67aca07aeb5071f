"""The split-keys decode attention (server/engine_flashdecode.py) run by Triton's interpreter on
this CPU: collected only by `test_engine_flashdecode.py`, which runs this file in a child pytest
with TRITON_INTERPRET=1 (Triton reads it when the kernels are defined, at import)."""

from __future__ import annotations

import os

import pytest
import torch
from triton.runtime import interpreter

from server.engine_decode import position_bias
from server.engine_flashdecode import flash_decode, sdpa_decode, splits_for
from tests.unit.server.test_engine_graphs import LENGTHS, VOCAB, forward_logits, tiny_model

assert os.environ.get("TRITON_INTERPRET") == "1", "run by test_engine_flashdecode.py"

_convert = interpreter._implicit_cvt


def _scalar_ints(arg):
    """The interpreter passes an int argument as a 1-element array, and NumPy 2 refuses
    `int()` of those (a loop bound): give it a 0-d one, as the compiled kernel sees a scalar."""
    converted = _convert(arg)
    if isinstance(arg, int):
        converted.handle.data = converted.handle.data.reshape(())
    return converted


interpreter._implicit_cvt = _scalar_ints


@pytest.mark.parametrize(
    "rows, kv_heads, groups, head_dim, keys, splits, dtype",
    [
        (1, 4, 1, 64, 256, None, torch.float32),
        (3, 2, 3, 32, 192, 3, torch.float32),
        (3, 2, 3, 32, 192, 1, torch.float32),
        (2, 2, 2, 16, 70, 2, torch.float32),
        (2, 4, 1, 128, 300, None, torch.float16),  # the interpreter's bf16 dot is wrong
    ],
)
def test_kernel_equals_sdpa_and_writes_the_same_cache(
    rows, kv_heads, groups, head_dim, keys, splits, dtype
):
    """Each row attends to its own keys 0..pos (the longest row's at the last column, another's
    at 0), over one split and several; the arena gets the step's K/V at pos, nothing else."""
    torch.manual_seed(0)
    shape = (2, rows, kv_heads, keys + 40, head_dim)  # columns past `keys` stay untouched
    arena = torch.randn(shape, dtype=dtype)
    expected_arena = arena.clone()
    q = torch.randn(rows, kv_heads, groups, head_dim, dtype=dtype)
    pos = torch.randint(0, keys, (rows,))
    pos[0] = keys - 1
    pos[-1] = 0 if rows > 2 else pos[-1]
    new = torch.randn(rows, 2, kv_heads, head_dim, dtype=dtype)
    bias = position_bias(pos, keys, dtype)
    scale = head_dim**-0.5
    expected = sdpa_decode(q, expected_arena[:, :, :, :keys], new, pos, bias, scale)
    got = flash_decode(q, arena[0, :, :, :keys], arena[1, :, :, :keys], new, pos, scale, splits)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    assert torch.equal(arena, expected_arena)


def test_splits_follow_the_grid():
    cpu = torch.device("cpu")  # counts 8 units: about 16 programs
    assert splits_for(1, 4, 256, cpu) == 4  # capped by the blocks of keys
    assert splits_for(1, 2, 4096, cpu) == 8
    assert splits_for(16, 32, 4096, cpu) == 1


def test_fused_step_with_the_kernel_equals_the_forward():
    """The fused pieces with `attention="flash"`: one row, then three at different positions,
    over padded key ranges, give the forward's logits."""
    from server.engine_batch import Arena
    from server.engine_fused import FusedPieces
    from server.engine_lean import LeanDecode
    from server.kv_cache import KVStore

    model = tiny_model(num_key_value_heads=2)
    seqs = [torch.randint(0, VOCAB, (n,)) for n in LENGTHS]
    expected = forward_logits(model, seqs)  # [3, V]
    lean = LeanDecode(model, pack=False)
    lean.fused = FusedPieces(lean, model.config, attention="flash")
    lean.fused.warm_up()
    arena = Arena.for_model(KVStore(1 << 30), model, max_rows=4)
    assert arena.ensure(len(seqs), 300)
    with torch.inference_mode():
        for row, seq in enumerate(seqs):
            for pos, token in enumerate(seq[:-1].tolist()):
                one = torch.tensor([token]), torch.tensor([pos])
                lean.static_step(arena, row, row + 1, *one, 16)
        ids = torch.tensor([int(s[-1]) for s in seqs])
        pos = torch.tensor([len(s) - 1 for s in seqs])
        for k_len in (13, 64, arena.capacity):
            got = lean.static_step(arena, 0, 3, ids, pos, k_len)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
