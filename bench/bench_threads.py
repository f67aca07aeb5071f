"""Why only the engine thread runs torch on several threads: the one-row decode step on a fresh
thread while it holds the process's only OpenMP pool, then again while a second thread keeps a
pool of its own (libgomp then makes idle workers sleep instead of spin; server/threads.py).

Usage: python bench/bench_threads.py [--dtype bfloat16] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.llm import load_llm  # noqa: E402
from server.engine_batch import Arena  # noqa: E402
from server.engine_lean import LeanDecode  # noqa: E402
from server.kv_cache import KVStore  # noqa: E402
from server.threads import on_own_thread, single_threaded  # noqa: E402

STEPS = 64  # one-row steps per timing
REPEATS = 3  # timings per case; the median is printed


def step_ms(lean: LeanDecode, arena: Arena) -> float:
    """Median ms of a one-row step over positions 8..8+STEPS, on the calling thread."""
    runs = []
    with torch.inference_mode():
        for _ in range(REPEATS):
            lean.step(arena, 0, 1, [0], [1])  # warm
            start = time.perf_counter()
            for pos in range(8, 8 + STEPS):
                lean.step(arena, 0, 1, [pos], [1])
            runs.append((time.perf_counter() - start) / STEPS * 1e3)
    return statistics.median(runs)


def other_pool(threads: int, ready: threading.Event, done: threading.Event) -> None:
    """A thread that runs one multi-threaded op (so libgomp gives it a pool), then idles."""
    torch.set_num_threads(threads)
    x = torch.randn(1024, 1024)
    (x @ x).sum()
    ready.set()
    done.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    llm = on_own_thread(load_llm, "default", "cpu", getattr(torch, args.dtype))
    single_threaded()
    rows = []
    for kind, compile_row in (("compiled", True), ("lean (oneDNN)", False)):
        lean = on_own_thread(LeanDecode, llm.model, None, compile_row, threads=args.threads)
        arena = Arena.for_model(KVStore(1 << 32), llm.model, max_rows=1)
        arena.ensure(1, 8 + STEPS + 1)
        alone = on_own_thread(step_ms, lean, arena, threads=args.threads)
        ready, done = threading.Event(), threading.Event()
        rival = threading.Thread(target=other_pool, args=(args.threads or 2, ready, done))
        rival.start()
        ready.wait()
        shared = on_own_thread(step_ms, lean, arena, threads=args.threads)
        done.set()
        rival.join()
        again = on_own_thread(step_ms, lean, arena, threads=args.threads)
        rows.append((kind, alone, shared, again))
    print(f"\n{llm.name} on cpu ({args.dtype}), one-row decode step, median of {REPEATS} x {STEPS}")
    print(f"command: python {' '.join(sys.argv)}\n")
    print(f"{'step':<16}{'only pool (ms)':>16}{'2nd pool alive':>16}{'ratio':>8}{'after':>10}")
    for kind, alone, shared, again in rows:
        print(f"{kind:<16}{alone:>16.1f}{shared:>16.1f}{shared / alone:>7.2f}x{again:>10.1f}")


if __name__ == "__main__":
    main()
