"""Split-K projections: the partial products sum to the plain projection, with and without a
bias, for one row and several; only slices that keep their alignment are candidates."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from server.engine_splitk import SLICE_ALIGN, pick_split, project, split_k_linear, splits_for


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("split", [2, 4])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_split_k_sums_to_the_projection(rows, split, with_bias):
    gen = torch.Generator().manual_seed(split * 10 + rows)
    x = torch.randn(rows, 256, generator=gen)
    weight = torch.randn(96, 256, generator=gen)
    bias = torch.randn(96, generator=gen) if with_bias else None
    parts = split_k_linear(x, weight, split)
    assert parts.shape == (split, rows, 96)
    torch.testing.assert_close(parts.sum(0), x @ weight.T, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(
        project(x, weight, bias, split), F.linear(x, weight, bias), rtol=1e-5, atol=1e-4
    )
    # each partial product is its slice of the input against the same slice of the weight
    width = 256 // split
    torch.testing.assert_close(parts[1], x[:, width : 2 * width] @ weight[:, width : 2 * width].T)


def test_only_aligned_splits_are_timed_and_cpu_keeps_the_plain_gemm():
    assert splits_for(torch.empty(8, 4 * SLICE_ALIGN)) == [1, 2, 4]
    assert splits_for(torch.empty(8, 2 * SLICE_ALIGN + SLICE_ALIGN)) == [1]  # 3 slices' width
    assert splits_for(torch.empty(8, 6 * SLICE_ALIGN)) == [1, 2]
    assert splits_for(torch.empty(8, 11008)) == [1, 2, 4]  # Llama-2-7B down: 172 x 64
    assert pick_split(torch.randn(8, 256), None, "down_proj") == 1  # no timing off CUDA
