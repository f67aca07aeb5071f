"""CUDA graphs of the lean decode step, one per (rows, key block), replayed for every step.

Own capture rather than `torch.compile(mode="reduce-overhead")`: a decode step of a 7B model is
~18 kernels a layer, ~580 launches, whose CPU cost (an eager step: 10-30 ms on an H100) dwarfs
the 4.5 ms the GPU needs to stream the weights (replayed: 6.9 ms for one row, 8.0 for 16; 6.2
and 7.1 with the pointwise work fused, server/engine_fused.py), and once the key range is
rounded up to a block (`LeanDecode.static_step`: rows mask the columns past their position)
the step's shapes and buffers are fixed, so a plain `torch.cuda.CUDAGraph` per (first row, last
row, key block) replays it with one launch. Graphs point at the arena's storage, so an arena
that grows (a new tensor) drops them; they share one memory pool; the least recently used go
past `GRAPH_MAX`.

Dims: B decoding rows, V vocabulary.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from server.engine_batch import Arena

if TYPE_CHECKING:
    from server.engine_lean import LeanDecode

log = logging.getLogger(__name__)

GRAPH_KEY_BLOCK = 128  # key columns a graph covers beyond the longest row, at most this many
GRAPH_MAX = 96  # graphs kept, least recently used dropped first


@dataclass
class StepGraph:
    """One captured step: write `inputs` [2, B] (token ids, positions), `replay`, read
    `logits` [B, V]. Without a CUDA graph (`replay` runs the step eagerly) the same bookkeeping
    runs on any device, which is how the CPU tests check it."""

    inputs: torch.Tensor  # [2, B] int64 on the arena's device
    run: Callable[[], torch.Tensor]
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None  # [B, V], the graph's output buffer

    def replay(self) -> torch.Tensor:
        if self.graph is None:
            return self.run()
        self.graph.replay()
        return self.logits


class GraphedDecode:
    """`step(arena, lo, hi, positions, tokens)` -> logits [B, V], as `LeanDecode.step`."""

    def __init__(
        self, lean: LeanDecode, block: int = GRAPH_KEY_BLOCK, capture: bool = True
    ) -> None:
        """`capture=False`: replay runs the static step eagerly (tests on CPU)."""
        self.lean = lean
        self.block = block
        self.capture = capture
        self.graphs: OrderedDict[tuple[int, int, int], StepGraph] = OrderedDict()
        self.arena_key: tuple | None = None
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.stream = torch.cuda.Stream() if capture else None  # where graphs are captured
        self.captured = 0  # graphs captured so far (a figure for logs and tests)
        self.failed: str | None = None  # why capturing stopped; steps then run eagerly
        self.last: tuple[tuple[int, int, int], StepGraph, list[int]] | None = None  # `chain`'s

    def key_length(self, arena: Arena, positions: list[int]) -> int:
        """Key columns a step attends over: the longest row's, rounded up to a block."""
        need = max(positions) + 1
        return min(arena.capacity, -(-need // self.block) * self.block)

    def step(
        self, arena: Arena, lo: int, hi: int, positions: list[int], tokens: list[int]
    ) -> torch.Tensor:
        assert arena.data is not None
        arena_key = (arena.data.data_ptr(), tuple(arena.data.shape))
        if arena_key != self.arena_key:  # a new arena tensor: every graph points at the old one
            self._drop_all()
            self.arena_key = arena_key
        inputs = torch.tensor([tokens, positions], dtype=torch.long)  # [2, B] on the host
        k_len = self.key_length(arena, positions)
        key = (lo, hi, k_len)
        graph = self.graphs.get(key)
        self.last = None
        if graph is None:
            graph = self._capture(arena, lo, hi, k_len, inputs) if self.failed is None else None
            if graph is None:
                return self.lean.static_step(arena, lo, hi, *inputs.to(arena.device), k_len)
        else:
            self.graphs.move_to_end(key)
            graph.inputs.copy_(inputs)
        self.last = key, graph, list(positions)
        return graph.replay().clone()  # [B, V]; the buffer is the next replay's

    def chain(self, arena: Arena, lo: int, hi: int, ids: torch.Tensor) -> torch.Tensor | None:
        """The step after the last one: the same rows one position on, fed `ids` [B] (the last
        step's tokens, still on the device) through the same graph, its inputs updated in place
        on the device, so the host never waits for the last step -> logits [B, V]. None where
        that graph cannot serve it (other rows, another key block or arena, no last step)."""
        if self.last is None or self.arena_key != (arena.data.data_ptr(), tuple(arena.data.shape)):
            return None
        key, graph, positions = self.last
        following = [p + 1 for p in positions]
        if key != (lo, hi, self.key_length(arena, following)):
            return None
        graph.inputs[0].copy_(ids)
        graph.inputs[1].add_(1)
        self.last = key, graph, following
        return graph.replay().clone()

    def _capture(
        self, arena: Arena, lo: int, hi: int, k_len: int, inputs: torch.Tensor
    ) -> StepGraph | None:
        """A graph of this step; the warm-up run before capture computes the step's K/V (replay
        writes the same values again). None when capture fails (logged; no more tries)."""
        static = inputs.to(arena.device)  # [2, B]

        def run() -> torch.Tensor:
            return self.lean.static_step(arena, lo, hi, static[0], static[1], k_len)

        graph = StepGraph(static, run)
        if self.capture:
            try:
                self._record(graph)
            except Exception as exc:  # an op that cannot be captured, out of memory, ...
                self.failed = repr(exc)
                self._drop_all()
                log.warning("capturing a CUDA graph failed, decoding eagerly: %s", self.failed)
                return None
        self.captured += 1
        self.graphs[(lo, hi, k_len)] = graph
        while len(self.graphs) > GRAPH_MAX:
            self.graphs.popitem(last=False)
        if self.captured in (1, 10, 100) or self.captured % 1000 == 0:
            log.info("decode step: %d CUDA graphs captured (rows %d-%d, %d keys)",
                     self.captured, lo, hi, k_len)  # fmt: skip
        return graph

    def _record(self, graph: StepGraph) -> None:
        """Capture `graph.run` on a side stream into the shared pool. The first capture runs
        the step once before (lazy initialisations: cuBLAS workspaces, kernel choices), as
        torch asks; `torch.cuda.graph` is not used because its garbage collection before every
        capture holds the GIL for tens of ms, which stalls the event loop's thread."""
        current = torch.cuda.current_stream()
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            if self.captured == 0:
                graph.run()
                self.stream.synchronize()
            graph.graph = torch.cuda.CUDAGraph()
            graph.graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
            try:
                graph.logits = graph.run()
            finally:
                graph.graph.capture_end()
        current.wait_stream(self.stream)

    def _drop_all(self) -> None:
        """Forget every graph, and the pool with them: once all graphs sharing a pool are gone,
        torch's allocator refuses that pool's handle for a new capture."""
        self.graphs.clear()
        if self.capture:
            self.pool = torch.cuda.graph_pool_handle()
