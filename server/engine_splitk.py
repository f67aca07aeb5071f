"""Split-K projections for the fused decode step: x W^T as `split` partial products over slices
of the input width, one strided batched GEMM, summed by the compiled piece that reads them.

Own op because on an H100 (Llama-2-7B shape, bf16, one row; server/engine_fused.py) cuBLAS runs
the gate/up GEMV [22016, 4096] on 86 thread blocks and down [4096, 11008] on 64, for 132 SMs,
streaming their weights at 2.64 and 2.46 TB/s against ~2.97 for the q/k/v and o kernels it
splits itself; slicing the input width gives it `split` times the blocks, and the partial sums
cost nothing where the next fused kernel adds them. It is an opaque op in the graph, so inductor
neither copies the weight into another layout nor decomposes the GEMM; which split a projection
gets is timed on the device when the pieces are built (`pick_split`).

Measured on an H100 (`bench/bench_step.py --profile`, two runs): timing picks split 2 for
gate/up (69.1 vs 69.5 us alone) and 1 for down (36.1 vs 42.3-45.5); cuBLAS then runs gate/up
on its 128x8 kernel, 2.06 against 2.18 ms a step, and the graphed one-row step takes 6.16-6.20
against 6.22-6.24 ms unsplit: 0.6% (16 rows: 7.26-7.28 against 7.13-7.26, so batches keep the
plain GEMM). A Triton GEMV (whole weight rows per program in pipelined strips, block shape
autotuned) was slower than cuBLAS on all four projections (qkv 51 vs 39 us, o 81 vs 18, gate/up
80 vs 70, down 54 vs 36) and was not kept.

Dims: S splits, B rows, D_in input width, D_out output width.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SPLITS = (1, 2, 4)  # candidates; 1 is the plain GEMM
SLICE_ALIGN = 64  # elements; each slice of the input width a multiple of this
TIMING_REPS = 50


@torch.library.custom_op("speechchat::split_k_linear", mutates_args=())
def split_k_linear(x: torch.Tensor, weight: torch.Tensor, split: int) -> torch.Tensor:
    """x [B, D_in], weight [D_out, D_in] -> partial products [S, B, D_out] (their sum is
    x W^T): slice s of x against slice s of every weight row, read in place."""
    rows, (out_features, in_features) = x.shape[0], weight.shape
    width = in_features // split
    w = weight.view(out_features, split, width).transpose(0, 1)  # [S, D_out, D_in / S]
    xs = x.reshape(rows, split, width).transpose(0, 1)  # [S, B, D_in / S]
    return torch.bmm(xs, w.transpose(1, 2))  # [S, B, D_out]


@split_k_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, split: int) -> torch.Tensor:
    return x.new_empty(split, x.shape[0], weight.shape[0])


def project(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, split: int
) -> torch.Tensor:
    """x [B, D_in] -> x W^T + b [B, D_out], in `split` slices when split > 1 and one row is
    projected (the split was timed for one row; the step's row count is static per graph)."""
    if split == 1 or x.shape[0] != 1:
        return F.linear(x, weight, bias)
    y = split_k_linear(x, weight, split).sum(0)  # [B, D_out]
    return y if bias is None else y + bias


def splits_for(weight: torch.Tensor) -> list[int]:
    """The candidate splits whose slices keep `SLICE_ALIGN` alignment for this weight."""
    return [s for s in SPLITS if weight.shape[1] % (s * SLICE_ALIGN) == 0]


def pick_split(weight: torch.Tensor, bias: torch.Tensor | None, name: str) -> int:
    """The fastest split of one row through this projection on its CUDA device (1 elsewhere):
    each candidate's GEMM alone (the sum is fused away in the step), `TIMING_REPS` times."""
    if weight.device.type != "cuda":
        return 1
    x = weight.new_zeros(1, weight.shape[1])  # [1, D_in]
    times = {}
    for split in splits_for(weight):
        run = (lambda: F.linear(x, weight, bias)) if split == 1 else (
            lambda s=split: split_k_linear(x, weight, s)
        )  # fmt: skip
        for _ in range(5):
            run()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(TIMING_REPS):
            run()
        end.record()
        end.synchronize()
        times[split] = start.elapsed_time(end) / TIMING_REPS * 1e3  # us
    best = min(times, key=times.get)
    log.info(
        "split-K %s %s: %s -> split %d", name, tuple(weight.shape),
        ", ".join(f"{s}: {t:.1f} us" for s, t in times.items()), best,
    )  # fmt: skip
    return best
