"""Decode-step time for 1, 4 and 16 rows, eager lean step vs compiled (CUDA graphs on a GPU, with
and without the fused pieces; the compiled one-row step on CPU), against the time to stream the
weights once: where a worker's decode rate goes, without the worker around it.

Usage:
  python bench/bench_step.py --llm llama2-7b-random --device cuda --tokenizer DIR [--profile]
  python bench/bench_step.py                       # embedded SmolLM2 on this CPU

`--profile` (CUDA): the GPU kernels of ten one-row static steps, fused and plain, by total time.
On CUDA, where the fused pieces split the MLP's projections (server/engine_splitk.py) or attend
with the split-keys kernel (server/engine_flashdecode.py), the same pieces without splitting,
and with SDPA, get a column of their own; the timings behind each choice are logged.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.models import (  # noqa: E402
    add_model_args,
    build_llm,
    bytes_per_token,
    measure_bandwidth,
    sync,
)
from server.engine_batch import Arena  # noqa: E402
from server.engine_fused import NO_SPLIT, FusedPieces  # noqa: E402
from server.engine_graphs import GraphedDecode  # noqa: E402
from server.engine_lean import LeanDecode  # noqa: E402
from server.kv_cache import KVStore  # noqa: E402
from server.threads import on_own_thread  # noqa: E402

STEPS = 48  # steps per timing
REPEATS = 3  # timings per case; the median is printed
START = 200  # the rows' first position (a short conversation's cache behind each)


def step_ms(lean: LeanDecode, arena: Arena, rows: int) -> float:
    """Median ms of a step of `rows` rows at positions START.. (after a warm-up pass)."""
    device = arena.device
    runs = []
    with torch.inference_mode():
        for attempt in range(REPEATS + 1):
            sync(device)
            start = time.perf_counter()
            for pos in range(START, START + STEPS):
                lean.step(arena, 0, rows, [pos + r for r in range(rows)], [1] * rows)
            sync(device)
            if attempt:  # the first pass captures or compiles
                runs.append((time.perf_counter() - start) / STEPS * 1e3)
    return statistics.median(runs)


def profile_kernels(lean: LeanDecode, arena: Arena, label: str) -> None:
    """The GPU kernels of ten eager one-row static steps, by total time (their sum against the
    graphed step's time is what the gaps between kernels cost)."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.ones(1, dtype=torch.long, device=arena.device)
    pos = torch.tensor([START], device=arena.device)
    with torch.inference_mode():
        lean.static_step(arena, 0, 1, ids, pos, START + 56)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                lean.static_step(arena, 0, 1, ids, pos, START + 56)
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.self_device_time_total for e in events) / 10 / 1e3
    count = sum(e.count for e in events) / 10
    print(f"\n{label}: {count:.0f} kernels a step, {total:.2f} ms of kernel time a step")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:12]:
        print(
            f"  {e.self_device_time_total / 10 / 1e3:7.3f} ms  {e.count / 10:5.0f}x  {e.key[:90]}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--profile", action="store_true", help="CUDA: kernels of a step")
    args = parser.parse_args()
    logging.basicConfig(format="%(name)s: %(message)s")
    for name in ("server.engine_splitk", "server.engine_flashdecode"):  # the timed choices
        logging.getLogger(name).setLevel(logging.INFO)
    device = torch.device(args.device)
    llm = on_own_thread(build_llm, args, threads=args.threads)
    bandwidth = on_own_thread(measure_bandwidth, device, threads=args.threads)
    stream_ms = bytes_per_token(llm) / bandwidth * 1e3
    arena = Arena.for_model(KVStore(64 << 30), llm.model, max_rows=max(args.rows))
    assert arena.ensure(max(args.rows), START + STEPS + max(args.rows))
    lean = on_own_thread(LeanDecode, llm.model, None, True, threads=args.threads)
    compiled, fused = lean.graphs or lean.row_step, lean.fused
    gpu = device.type == "cuda"
    unsplit = None  # the fused pieces without split-K, where the timed ones split
    if gpu and fused is not None and fused.splits != NO_SPLIT:
        unsplit = on_own_thread(FusedPieces, lean, llm.model.config, NO_SPLIT)
        on_own_thread(unsplit.warm_up)
    with_sdpa = None  # the fused pieces attending with SDPA, where timing chose the kernel
    if gpu and fused is not None and fused.attention == "flash":
        with_sdpa = on_own_thread(FusedPieces, lean, llm.model.config, fused.splits, "sdpa")
        on_own_thread(with_sdpa.warm_up)
    print(f"\n{llm.name} on {args.device} ({llm.dtype}); weights stream in {stream_ms:.2f} ms "
          f"at {bandwidth / 1e9:.0f} GB/s")  # fmt: skip
    plain_col = f" {'graphs ms':>10}" if gpu else ""
    plain_col += f" {'no split-K':>10}" if unsplit is not None else ""
    plain_col += f" {'SDPA attn':>10}" if with_sdpa is not None else ""
    print(f"{'rows':>4} {'eager ms':>9}{plain_col} {'compiled ms':>12} {'speed-up':>9} "
          f"{'bound/compiled':>15}")  # fmt: skip
    for rows in args.rows:
        lean.graphs, lean.row_step = None, None
        eager = on_own_thread(step_ms, lean, arena, rows, threads=args.threads)
        plain = ""
        if gpu:  # graphs of the plain static step, then of the fused one (fresh graphs each)
            lean.fused, lean.graphs = None, GraphedDecode(lean)
            plain = f" {on_own_thread(step_ms, lean, arena, rows):>10.2f}"
            if unsplit is not None:
                lean.fused, lean.graphs = unsplit, GraphedDecode(lean)
                plain += f" {on_own_thread(step_ms, lean, arena, rows):>10.2f}"
            if with_sdpa is not None:
                lean.fused, lean.graphs = with_sdpa, GraphedDecode(lean)
                plain += f" {on_own_thread(step_ms, lean, arena, rows):>10.2f}"
            lean.fused, lean.graphs = fused, GraphedDecode(lean)
        elif rows == 1:
            lean.row_step = compiled
        fast = on_own_thread(step_ms, lean, arena, rows, threads=args.threads)
        print(f"{rows:>4} {eager:>9.2f}{plain} {fast:>12.2f} {eager / fast:>8.2f}x "
              f"{100 * stream_ms / fast:>14.0f}%")  # fmt: skip
    if lean.graphs is not None:
        print(f"CUDA graphs captured: {lean.graphs.captured}; failed: {lean.graphs.failed}; "
              f"fused pieces: {fused is not None}, split-K {fused and fused.splits}, "
              f"attention {fused and fused.attention}")  # fmt: skip
    if args.profile and gpu:
        cases = [("fused static step", fused), ("plain static step", None)]
        if unsplit is not None:
            cases.insert(1, ("fused static step, no split-K", unsplit))
        if with_sdpa is not None:
            cases.insert(1, ("fused static step, SDPA attention", with_sdpa))
        for label, pieces in cases:
            lean.fused = pieces
            on_own_thread(profile_kernels, lean, arena, label)


if __name__ == "__main__":
    main()
