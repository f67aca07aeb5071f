"""Decode steps launched ahead: with greedy rows on CUDA graphs, the engine launches each step
before the last one's tokens reach the host. The graph's inputs take the last step's argmax on
the device, so detokenising, events and bookkeeping overlap the device's work instead of adding
to it. On an H100 (Llama-2-7B shape, bf16, `bench/bench_worker.py --quick`): single stream 176.0
tok/s against 168.0 with every step waiting, 78% / 75% of the 225 tok/s bandwidth bound. A step
launched for rows that then change (one ended, a request arrived) is dropped: its K/V writes are
past the ended rows' keys or written again, the same, by the next step.

Dims: B decoding rows, V vocabulary.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from server.engine_request import EngineRequest

if TYPE_CHECKING:
    from server.engine import Engine

log = logging.getLogger(__name__)


@dataclass
class Ahead:
    """A greedy decode step's tokens on their way to the host: `rows` at `positions` (each
    row's cached length when the step is consumed) and the tokens [B], copied into pinned
    memory behind the step on a CUDA device (`ready` says when they have landed)."""

    rows: list[EngineRequest]
    positions: list[int]
    ids: torch.Tensor  # [B] on the device: what the step after this one is fed
    host: torch.Tensor  # [B]
    ready: torch.cuda.Event | None

    @classmethod
    def of(cls, rows: list[EngineRequest], positions: list[int], logits: torch.Tensor) -> Ahead:
        ids = logits.argmax(dim=-1)  # [B]
        if not ids.is_cuda:
            return cls(rows, positions, ids, ids, None)
        host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
        host.copy_(ids, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return cls(rows, positions, ids, host, ready)

    def serves(self, rows: list[EngineRequest]) -> bool:
        """Whether these are the rows, in this order and at these lengths, it was launched for."""
        return len(rows) == len(self.rows) and all(
            a is b and len(a.row_keys) == p
            for a, b, p in zip(rows, self.rows, self.positions, strict=True)
        )

    def tokens(self) -> list[int]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()


def may_chain(engine: Engine) -> bool:
    """Whether the step after this one may be launched before this one's tokens are known:
    CUDA graphs, every row greedy and not at its token limit, no request waiting, being
    prefilled or on its way in a command, and room for one more position."""
    lean = engine.lean
    if not engine.launch_ahead or lean is None or lean.graphs is None:
        return False
    if engine.waiting or engine.prefilling:
        return False
    if not engine.commands.empty():
        return False
    for req in engine.decoding:
        params = req.params
        if params.temperature > 0.0 or req.completion_tokens + 1 >= params.max_new_tokens:
            return False
    need = max(len(r.row_keys) for r in engine.decoding) + 2  # this step's token and the next's
    return need <= min(engine.arena.capacity, engine.max_positions)


def launch_next(engine: Engine, ahead: Ahead) -> Ahead | None:
    """The next step for `ahead`'s rows, fed its tokens on the device; None where the last
    step's graph cannot serve it (the normal step then runs next time)."""
    try:
        logits = engine.lean.graphs.chain(engine.arena, 0, len(ahead.rows), ahead.ids)
    except Exception as err:  # the normal step runs next time, and reports what fails
        log.warning("launching the next decode step ahead failed: %r", err)
        return None
    if logits is None:
        return None
    engine.chained += 1
    return Ahead.of(ahead.rows, [p + 1 for p in ahead.positions], logits)
