"""Decode attention alone (CUDA): one query per row over its cached keys, as the graphed decode
step runs it per layer, through each SDPA backend, two batched matmuls (`grouped_attention`) and
the step's split-keys Triton kernel (server/engine_flashdecode.py, its own split count and one
split), against the time to read the K/V once.

Why: on an H100 (Llama-2-7B shape, bf16, one row, 256 keys) the step's attention is SDPA's
memory-efficient kernel at ~13 us a layer (0.42 ms of the 6.2 ms step) while its K/V (4 MB a
layer) stream in ~1.4 us; its tiles are 64 queries tall and each row has one. 0.3 ms off the
step is what stands between the worker and 75% of the bandwidth bound.

Usage:
  python bench/bench_attention.py                     # Llama-2-7B shape: 32 heads of 128
  python bench/bench_attention.py --heads 32 --kv-heads 8 --rows 1 16 --keys 256 1024 4096
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.engine_decode import grouped_attention, position_bias  # noqa: E402
from server.engine_flashdecode import flash_decode, graph_us, supports  # noqa: E402

REPS = 200


def candidates(q, keys, values, bias, pos, scale: float) -> list:
    """Calls to time, in the table's order after "read K/V": q [B, Hkv, G, Dh], keys/values
    [B, Hkv, K, Dh], bias [B, 1, 1, K], pos [B] (the kernel also writes K/V there: the
    step's indexed copy, which the others leave out)."""
    rows, dh = q.shape[0], q.shape[-1]

    def sdpa(backend, mask=bias):
        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)

        return run

    cases = [
        sdpa(SDPBackend.EFFICIENT_ATTENTION),
        sdpa(SDPBackend.CUDNN_ATTENTION),
        sdpa(SDPBackend.FLASH_ATTENTION, None),  # * no mask: every key, an upper bound
        sdpa(SDPBackend.MATH),
        lambda: grouped_attention(q.view(rows, -1, 1, dh), keys, values, bias, scale),
    ]
    if supports(q):
        new = torch.stack((keys[torch.arange(rows), :, pos], values[torch.arange(rows), :, pos]), 1)
        cases.append(lambda: flash_decode(q, keys, values, new, pos, scale))
        cases.append(lambda: flash_decode(q, keys, values, new, pos, scale, 1))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--keys", type=int, nargs="+", default=[256, 1024, 4096])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    dev, dtype = torch.device("cuda"), torch.bfloat16
    hkv, g, dh = args.kv_heads, args.heads // args.kv_heads, args.head_dim
    scale = 1 / math.sqrt(dh)
    cap = max(args.keys) + 128
    print(f"{torch.cuda.get_device_name()}, {args.heads} query / {hkv} K/V heads of {dh}, bf16; "
          f"us a call, replayed from a CUDA graph")  # fmt: skip
    names = ["read K/V", "efficient", "cudnn", "flash*", "math", "matmuls"]
    names += ["flash (auto)", "flash 1 split"]
    print(f"{'rows':>4} {'keys':>5} " + " ".join(f"{n:>14}" for n in names))
    for rows in args.rows:
        arena = torch.randn(2, rows, hkv, cap, dh, device=dev, dtype=dtype)  # as the engine's
        for k_len in args.keys:
            keys, values = arena[0, :, :, :k_len], arena[1, :, :, :k_len]  # strided views
            q = torch.randn(rows, hkv, g, dh, device=dev, dtype=dtype)
            pos = torch.randint(k_len // 2, k_len, (rows,), device=dev)
            pos[0] = k_len - 1
            bias = position_bias(pos, k_len, dtype)  # [B, 1, 1, K]
            expected = grouped_attention(q.view(rows, -1, 1, dh), keys, values, bias, scale)
            expected = expected.view(rows, hkv, g, dh)
            kv_bytes = 2 * keys.numel() * keys.element_size()
            row = [kv_bytes / 3.0e12 * 1e6]  # at ~3 TB/s

            cases = candidates(q, keys, values, bias, pos, scale)
            for i, case in enumerate(cases):
                try:
                    got = case().reshape(rows, hkv, g, dh)
                    if names[i + 1] != "flash*":
                        torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
                    row.append(graph_us(case, reps=REPS))
                except Exception as err:  # a backend that refuses these shapes
                    print(f"  {names[i + 1]}: {type(err).__name__}: {str(err)[:120]}")
                    row.append(float("nan"))
            print(f"{rows:>4} {k_len:>5} " + " ".join(f"{t:>14.1f}" for t in row))


if __name__ == "__main__":
    main()
