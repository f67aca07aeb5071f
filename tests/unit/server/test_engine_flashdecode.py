"""The split-keys decode attention of the graphed CUDA step (server/engine_flashdecode.py):
checked by Triton's interpreter on any machine (a child pytest over interpreted_flashdecode.py),
chosen by name or by timing, and on CUDA captured in graphs whose replays equal the forward."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from server.engine_batch import Arena
from server.engine_fused import FusedPieces
from server.engine_lean import LeanDecode
from server.kv_cache import KVStore
from tests.unit.server.test_engine_graphs import (
    GQA_AND_MHA,
    LENGTHS,
    VOCAB,
    decode_rows,
    forward_logits,
    tiny_model,
)

ROOT = Path(__file__).resolve().parents[3]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_the_kernel_under_triton_interpreter():
    """The kernel equals SDPA and writes the same cache, and the fused step with it equals the
    forward, on this CPU through Triton's interpreter (it runs the kernel's own code)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/unit/server/interpreted_flashdecode.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "7 passed" in done.stdout


def test_attention_is_sdpa_off_cuda_and_named_ones_only():
    model = tiny_model()
    lean = LeanDecode(model, pack=False)
    assert FusedPieces(lean, model.config).attention == "sdpa"  # nothing to time on a CPU
    with pytest.raises(ValueError, match="'flash' or 'sdpa'"):
        FusedPieces(lean, model.config, attention="paged")


@CUDA
@GQA_AND_MHA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_graphs_with_the_kernel_equal_the_forward(overrides, dtype):
    """Graphs captured with the kernel (one row, then three) replay the forward's logits."""
    model = tiny_model("cuda", dtype, **overrides)
    seqs = [torch.randint(0, VOCAB, (n,), device="cuda") for n in LENGTHS]
    expected = forward_logits(model, seqs)  # [3, V]
    lean = LeanDecode(model, compiled=True)
    lean.fused = FusedPieces(lean, model.config, attention="flash")
    lean.fused.warm_up()
    arena = Arena.for_model(KVStore(1 << 30), model, max_rows=4)
    assert arena.ensure(len(seqs), max(LENGTHS))
    got = decode_rows(lean, arena, seqs)
    assert lean.graphs.failed is None and lean.graphs.captured == 4
    rtol, atol = (1e-3, 1e-3) if dtype == torch.float32 else (5e-2, 0.2)
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)
