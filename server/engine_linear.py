"""Decode projections: several Linears fused into one weight (q/k/v, gate/up) and, on CPU, a
second copy of each weight in oneDNN's packed layout.

On CPU, several rows (a batched step, a prefill chunk) read the packed copy (`torch.ops.mkldnn`,
the kernels inductor's CPU freezing pass uses): measured on SmolLM2, 2 cores, all 121
projections take 31 ms for 4 rows and 60 for 16, against 83 and 82 ms through `F.linear`, and
46 vs 62 ms for a 128-token chunk (per 10 layers); models over `PACK_MAX_BYTES` skip the copy.
Fused weights are views into one tensor (no second copy; HF's forward, `generate` and training
see the same parameters).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PACK_ROWS = 16  # rows oneDNN's packed layout is tuned for (1 to 16 all run well with it)
PACK_PAD = 64  # zero rows added to a packed weight with a multiple of 1024 rows (pack_weight)
PACK_MAX_BYTES = 8 << 30  # bytes; larger CPU models decode from their own weights
PACK_DTYPES = (torch.float32, torch.bfloat16)


class DecodeLinear:
    """x [N, in] -> x W^T + b [N, out]: through oneDNN's packed copy of W where there is one
    (CPU; from one row on it beats MKL's GEMV: SmolLM2, 2 cores, a one-row step 35 vs 45 ms in
    fp32, 24-27 vs 30-36 ms in bf16), else through W itself (an [out, in] view)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, pack: bool) -> None:
        self.weight = weight  # [out, in]
        self.bias = bias  # [out] or None
        self.out = weight.shape[0]
        self.packed, self.packed_bias = pack_weight(weight, bias) if pack else (None, None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        y = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.packed_bias, "none", [], "")
        return y if y.shape[-1] == self.out else y[:, : self.out]  # [N, out]


def pack_weight(
    weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """oneDNN's packed copy of W [out, in] (and the bias to use with it). A weight whose `out`
    is a multiple of 1024 gets `PACK_PAD` zero rows first: oneDNN runs such shapes at half speed
    for 4 to 16 rows (SmolLM2's gate/up [3072, 576], 2 cores, 16 rows: 1085 us vs 547 us for
    [3136, 576]; 4 rows: 452 vs 368 us; the LM head [49152, 576] is as fast either way)."""
    w = weight.detach()
    if w.shape[0] % 1024 == 0:
        w = torch.cat([w, w.new_zeros(PACK_PAD, w.shape[1])])  # [out + PACK_PAD, in]
        if bias is not None:
            bias = torch.cat([bias, bias.new_zeros(PACK_PAD)])
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), PACK_ROWS), bias


def should_pack(model: torch.nn.Module, weight_bytes: int) -> bool:
    """oneDNN-packed decode weights: CPU, fp32/bf16, oneDNN present, not too big to copy."""
    return (
        model.device.type == "cpu"
        and model.dtype in PACK_DTYPES
        and torch.backends.mkldnn.is_available()
        and weight_bytes <= PACK_MAX_BYTES
    )


def fuse_linears(
    linears: list[torch.nn.Linear], transposed: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Store several Linears' weights in one tensor and point each Linear at its slice.

    Returns the fused weight [sum(out), in] (`transposed`: a transposed view whose storage is
    [in, sum(out)], the layout MKL's GEMV streams fastest) and the fused bias (None when none
    has one)."""
    parts = [lin.weight.detach() for lin in linears]  # [out_i, in]
    with torch.no_grad():
        if transposed:
            fused = torch.cat([w.t() for w in parts], dim=1).contiguous().t()  # [sum(out), in]
        else:
            fused = torch.cat(parts).contiguous()  # [sum(out), in]
        row = 0
        for lin in linears:
            n = lin.weight.shape[0]
            lin.weight.data = fused[row : row + n]  # [out_i, in] view, same values
            row += n
    return fused, concat_biases(linears)


def concat_biases(linears: list[torch.nn.Linear]) -> torch.Tensor | None:
    """The Linears' biases end to end [sum(out)] (zeros for one without); None if none has."""
    if all(lin.bias is None for lin in linears):
        return None
    return torch.cat([
        lin.bias.detach() if lin.bias is not None else lin.weight.new_zeros(lin.weight.shape[0])
        for lin in linears
    ])  # fmt: skip


def decode_linear(linears: list[torch.nn.Linear], pack: bool, transposed: bool) -> DecodeLinear:
    """One `DecodeLinear` computing the given Linears side by side (outputs concatenated)."""
    if len(linears) == 1:  # the Parameter itself: a later re-layout (lay_out_for_decode) shows
        return DecodeLinear(linears[0].weight, linears[0].bias, pack)
    return DecodeLinear(*fuse_linears(linears, transposed), pack)
