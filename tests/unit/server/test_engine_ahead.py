"""Decode steps launched ahead (server/engine.py `_decode_step`): where every row is greedy the
engine feeds the next step its tokens on the device before they reach the host. Here the graph
bookkeeping runs without capture on this CPU (`GraphedDecode(capture=False)`), so the same
chaining decides every step, and the worker's checks hold through it: output equal to
`generate` (one request, eight batched sessions, turn 5 on a reused cache, after eviction),
stop strings and seeded sampling beside it, and cancellation freeing the row and its cache."""

from __future__ import annotations

import pytest

from server import engine_forward
from server.engine_graphs import GraphedDecode
from tests.unit.server import test_worker, test_worker_control

varied = test_worker.varied  # the random Llama whose greedy answers vary


@pytest.fixture
def chained(monkeypatch) -> list[int]:
    """Every engine built while it is active decodes through uncaptured graphs; the list
    counts the steps launched ahead."""
    launched: list[int] = []
    build, chain = engine_forward.build_decoder, GraphedDecode.chain

    def build_with_graphs(model, decode_step):
        lean = build(model, decode_step)
        if lean is not None:
            lean.graphs = GraphedDecode(lean, block=16, capture=False)  # blocks end often
        return lean

    def counted(self, *args):
        logits = chain(self, *args)
        launched.append(logits is not None)
        return logits

    monkeypatch.setattr(engine_forward, "build_decoder", build_with_graphs)
    monkeypatch.setattr(GraphedDecode, "chain", counted)
    return launched


@pytest.mark.parametrize(
    "check",
    [
        test_worker.test_single_stateless_request_equals_generate,
        test_worker.test_turn_five_with_cache_reuse_equals_full_reprefill,
        test_worker.test_eviction_then_rebuild_equals_generate_within_budget,
        test_worker.test_seeded_sampling_and_stop_strings_match_respond,
        test_worker_control.test_cancel_mid_generation_frees_the_slot_and_cache,
    ],
    ids=lambda check: check.__name__.removeprefix("test_"),
)
def test_worker_checks_hold_with_steps_launched_ahead(varied, chained, check):
    check(varied)
    assert sum(chained) > 0  # steps really ran ahead


def test_eight_batched_sessions_launched_ahead_equal_generate(varied, chained):
    """Rows join and leave the batch: a step launched for rows that then change is dropped,
    and every answer is still `generate`'s."""
    engine = test_worker.eight_batched_sessions_equal_generate(varied, decode_step="lean").engine
    assert engine.chained == sum(chained) > 0
    assert not all(chained)  # at the end of a key block the next step waits for its graph
