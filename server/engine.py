"""The model thread: each step admits work, runs one packed prefill of the waiting requests'
chunks (up to `prefill_chunk` tokens in all), then decodes every running row.

Own scheduler rather than transformers' ContinuousBatchingManager: that one schedules token-id
requests only, while our prompts hold audio embeddings (see server/engine_batch.py). Everything
here runs on the engine thread; other threads talk to it through `call` (a command queue drained
between steps), so cancellation and new requests take effect within one step.

Admission and prefill are a mixin (server/engine_prefill.py). Greedy decoding on CUDA graphs
launches each step before the last one's tokens reach the host (server/engine_ahead.py).

Dims: B decoding rows, Q prefill chunk positions, D LLM width, V vocabulary.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

import torch

from model.llm import LoadedLLM
from server import engine_forward as forward
from server.engine_ahead import Ahead, launch_next, may_chain
from server.engine_batch import Arena, SlotCache
from server.engine_lean import LeanDecode
from server.engine_prefill import Done, Prefills
from server.engine_request import EngineRequest, sample_rows
from server.kv_cache import KVEntry, KVStore
from server.threads import DEFAULT_THREADS

log = logging.getLogger(__name__)


class Engine(Prefills):
    """Owns the LLM's forward passes, the decode arena and the KV store."""

    def __init__(
        self,
        llm: LoadedLLM,
        store: KVStore,
        *,
        max_batch: int,
        prefill_chunk: int,
        prefill_rows: int = 8,
        decode_step: str = "lean",
        num_threads: int | None = None,
    ) -> None:
        if decode_step not in forward.DECODE_STEPS:
            raise ValueError(f"decode_step is one of {forward.DECODE_STEPS}, not {decode_step!r}")
        cfg = llm.model.config
        self.llm, self.model, self.store = llm, llm.model, store
        self.decode_step = decode_step
        self.lean: LeanDecode | None = None  # set on the engine thread (`_run`)
        self.num_threads = num_threads or DEFAULT_THREADS
        self.device = llm.device
        self.arena = Arena.for_model(store, llm.model, max_rows=max_batch)
        self.cache = SlotCache(self.arena, cfg.num_hidden_layers)
        self.max_positions = cfg.max_position_embeddings
        self.prefill_chunk = prefill_chunk  # prompt tokens per step, all prefilling requests
        self.prefill_rows = prefill_rows  # requests prefilled side by side
        self.commands: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self.waiting: deque[EngineRequest] = deque()
        self.prefilling: list[EngineRequest] = []  # rows len(decoding) .. (in any order)
        self.decoding: list[EngineRequest] = []  # index == arena row
        self.requests: dict[str, EngineRequest] = {}
        self.peak_batch = 0  # most rows decoded in one step, for tests and benchmarks
        self.peak_prefill_rows = 0  # most requests in one packed prefill
        self.ahead: Ahead | None = None  # the next decode step, launched before this one's tokens
        self.launch_ahead = True  # False: every step waits for the last one's tokens (benchmarks)
        self.chained = 0  # decode steps launched ahead (a figure for tests and benchmarks)
        self._thread: threading.Thread | None = None

    # -- any thread ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread; returns once its forward passes are built (or raises)."""
        built: Future[None] = Future()
        self._thread = threading.Thread(
            target=self._run, args=(built,), name="speechchat-engine", daemon=True
        )
        self._thread.start()
        built.result()

    def stop(self) -> None:
        """Cancel everything and end the thread (blocks until it has)."""
        self.commands.put(None)
        if self._thread is not None:
            self._thread.join()

    def call(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the engine thread before its next step."""
        self.commands.put(fn)

    def submit(self, req: EngineRequest) -> None:
        self.call(lambda: self._enqueue(req))

    def cancel(self, request_id: str) -> None:
        self.call(lambda: self._cancel(request_id))

    @property
    def active_count(self) -> int:
        return len(self.requests)

    # -- the loop --------------------------------------------------------------------------

    def _run(self, built: Future[None]) -> None:
        torch.set_num_threads(self.num_threads)  # OpenMP's thread count is per calling thread
        try:  # fused, packed, compiled here, on the thread that owns the cores (server/threads)
            self.lean = forward.build_decoder(self.model, self.decode_step)
        except BaseException as exc:  # raised again by `start`
            built.set_exception(exc)
            return
        built.set_result(None)
        with torch.inference_mode():
            while self._drain_commands():
                self.step()
            for req in list(self.requests.values()):
                self._cancel(req.request_id)

    def _drain_commands(self) -> bool:
        """Run queued commands (waiting for one when idle); False once told to stop."""
        block = not (self.prefilling or self.decoding or self.waiting)
        while True:
            try:
                cmd = self.commands.get(block=block)
            except queue.Empty:
                return True
            if cmd is None:
                return False
            cmd()
            block = False

    def step(self) -> None:
        """Admit what fits, run one prefill step, then one decode step for all rows."""
        self._admit()
        self._prefill_step()
        self._decode_step()

    def _enqueue(self, req: EngineRequest) -> None:
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def _forget(self, req: EngineRequest) -> None:
        self.requests.pop(req.request_id, None)

    # -- decode ----------------------------------------------------------------------------

    def _decode_step(self) -> None:
        """Decode every running row one token. Where every row is greedy and nothing waits (see
        `may_chain`), the next step is launched on the device before this one's tokens reach
        the host, so their text, events and bookkeeping run while the device computes."""
        ahead, self.ahead = self.ahead, None
        if not self.decoding:
            return
        done: list[Done] = self._check_room()
        if done:
            self._retire(done)
            if not self.decoding:
                return
        self.peak_batch = max(self.peak_batch, len(self.decoding))
        failed: dict[int, BaseException] = {}
        if ahead is None or not ahead.serves(self.decoding):
            logits, failed = self._forward_rows()  # [B, V]
            if failed or not may_chain(self):
                self._accept(sample_rows(self.decoding, logits), failed)
                return
            rows = list(self.decoding)
            ahead = Ahead.of(rows, [len(r.row_keys) for r in rows], logits)
        self.ahead = launch_next(self, ahead) if may_chain(self) else None
        self._accept(ahead.tokens(), failed)

    def _accept(self, tokens: list[int], failed: dict[int, BaseException]) -> None:
        """Each row's sampled token (or its error): emit text, end the rows that are done."""
        done = [(r, "error", failed[i]) for i, r in enumerate(self.decoding) if i in failed]
        for i, req in enumerate(self.decoding):
            if i in failed:
                continue
            req.row_keys.append(req.next_token)  # the token fed this step is cached now
            reason = req.accept_token(tokens[i])
            if reason is not None:
                done.append((req, reason, None))
        if done:
            self.ahead = None  # launched for rows that change now (its K/V writes past the
            # ended rows' keys are never read; the others' are written again, the same)
        self._retire(done)

    def _check_room(self) -> list[Done]:
        """Grow the arena for one more position per row; rows that cannot grow end ('length')."""
        need = max(len(r.row_keys) for r in self.decoding) + 1
        if need <= self.arena.capacity or self.arena.ensure(self.rows_in_use, need):
            full = [r for r in self.decoding if len(r.row_keys) + 1 > self.max_positions]
        else:
            full = [r for r in self.decoding if len(r.row_keys) + 1 > self.arena.capacity]
        return [(r, "length", None) for r in full]

    def _forward_rows(self) -> tuple[torch.Tensor, dict[int, BaseException]]:
        """Logits for every decoding row; if the batch fails, rows are retried alone."""
        try:
            return self._forward_decode(0, len(self.decoding)), {}
        except Exception as err:
            if len(self.decoding) == 1:
                return self._empty_logits(1), {0: err}
        failed: dict[int, BaseException] = {}
        rows = []
        for i in range(len(self.decoding)):
            try:
                rows.append(self._forward_decode(i, i + 1))  # [1, V]
            except Exception as err:  # isolate the row that breaks the batch
                failed[i] = err
                rows.append(self._empty_logits(1))
        return torch.cat(rows), failed  # [B, V]

    def _empty_logits(self, n: int) -> torch.Tensor:
        return torch.zeros(n, self.model.config.vocab_size, device=self.device)  # [n, V]

    def _forward_decode(self, lo: int, hi: int) -> torch.Tensor:
        reqs = self.decoding[lo:hi]
        positions, tokens = [len(r.row_keys) for r in reqs], [r.next_token for r in reqs]
        step = forward.decode_step  # -> [B, V]
        return step(self.model, self.cache, lo, hi, positions, tokens, self.llm.dtype, self.lean)

    # -- leaving ---------------------------------------------------------------------------

    def _retire(self, done: list[Done]) -> None:
        """End decoding requests: keep their KV (unless they failed), free and compact rows."""
        for req, reason, err in sorted(done, key=lambda d: -d[0].row):
            if err is None:
                self._save_kv(req)
            self._free_row(req)
            self._forget(req)  # before the events: a reader of stats sees it gone
            if err is None:
                req.finish(reason)
            else:
                req.fail(err)

    def _free_row(self, req: EngineRequest) -> None:
        """Fill the hole with the last decoding row, then the last prefill row fills that one."""
        last = len(self.decoding) - 1
        if req.row != last:
            moved = self.decoding[last]
            self.arena.move(last, req.row, len(moved.row_keys))
            moved.row = req.row
            self.decoding[req.row] = moved
        self.decoding.pop()
        if self.prefilling:
            tail = max(self.prefilling, key=lambda r: r.row)
            self.arena.move(tail.row, last, len(tail.row_keys))
            tail.row = last

    def _save_kv(self, req: EngineRequest) -> None:
        """Store a finished row's KV under its session, or as a reusable stateless prefix."""
        if req.row_keys:
            entry = KVEntry(self.arena.extract(req.row, len(req.row_keys)), list(req.row_keys))
            self.store.keep(entry, req.session_key, req.supersedes)

    def _cancel(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is None:
            return
        if req in self.prefilling:
            self._end_prefill(req, "cancelled")  # the prefix computed so far stays useful
        elif req in self.waiting:
            self.waiting.remove(req)
            self._forget(req)
            req.finish("cancelled")
        else:
            self._retire([(req, "cancelled", None)])
