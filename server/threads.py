"""One thread owns the CPU cores: only the engine thread runs torch ops on several threads.

libgomp (torch's OpenMP) keeps a pool of workers for each thread that starts parallel regions.
Once the pools together hold more threads than there are CPUs, every worker waits for the next
region by sleeping rather than spinning (libgomp's "throttled" spin count), so each of the
hundreds of parallel regions in a decode step pays a futex wake-up. Measured on SmolLM2, 2 cores,
one row: a 16-18 ms step took 30-32 ms once a second thread had a pool. So the other threads
that touch torch confine themselves to one thread (`single_threaded`), and multi-threaded work
outside the engine (loading a model) runs on a thread that then ends, which frees its pool
(`on_own_thread`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch

T = TypeVar("T")

# torch's own choice (OMP_NUM_THREADS, else the physical cores), read before any thread changes it
DEFAULT_THREADS = torch.get_num_threads()


def single_threaded() -> None:
    """Run the calling thread's torch ops on that thread alone (no OpenMP pool of its own)."""
    torch.set_num_threads(1)


def on_own_thread(
    fn: Callable[..., T], *args: Any, threads: int | None = None, name: str = "speechchat-load"
) -> T:
    """fn(*args) on a new thread with `threads` torch threads (default `DEFAULT_THREADS`); blocks
    until it returns (re-raising what it raised). The thread's OpenMP pool ends with it."""
    box: dict[str, Any] = {}

    def run() -> None:
        torch.set_num_threads(threads or DEFAULT_THREADS)
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
