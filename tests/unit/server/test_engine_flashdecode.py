"""The split-keys decode attention of the graphed CUDA step (server/engine_flashdecode.py):
checked by Triton's interpreter on any machine (a child pytest over interpreted_flashdecode.py),
and chosen by name or by timing (on CUDA, graphs captured with it: test_engine_graphs.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.engine_fused import FusedPieces
from server.engine_lean import LeanDecode
from tests.unit.server.test_engine_graphs import tiny_model

ROOT = Path(__file__).resolve().parents[3]


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
