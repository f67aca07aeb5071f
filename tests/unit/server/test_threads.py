"""Thread helpers: work on its own thread hands back its value or error; confining a thread to
one torch thread leaves the others alone."""

from __future__ import annotations

import threading

import pytest
import torch

from server.threads import DEFAULT_THREADS, on_own_thread, single_threaded


def test_on_own_thread_returns_the_value_from_another_thread():
    def work(a: int, b: int) -> tuple[int, int, str]:
        return a + b, torch.get_num_threads(), threading.current_thread().name

    total, threads, name = on_own_thread(work, 2, 3)
    assert (total, threads) == (5, DEFAULT_THREADS)
    assert name != threading.current_thread().name
    assert on_own_thread(work, 1, 1, threads=1)[1] == 1


def test_on_own_thread_raises_what_the_work_raised():
    def fail() -> None:
        raise KeyError("missing weights")

    with pytest.raises(KeyError, match="missing weights"):
        on_own_thread(fail)


def test_single_threaded_confines_only_the_calling_thread():
    seen: dict[str, int] = {}

    def confined() -> None:
        single_threaded()
        seen["confined"] = torch.get_num_threads()

    def other() -> None:
        torch.set_num_threads(2)
        seen["other"] = torch.get_num_threads()

    for target in (confined, other):
        thread = threading.Thread(target=target)
        thread.start()
        thread.join()
    assert seen == {"confined": 1, "other": 2}
