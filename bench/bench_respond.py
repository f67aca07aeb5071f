"""`speechchat respond` engines side by side: transformers' `generate` on left-padded batches
against the server's worker with the same number of prompts in flight, on the same texts in the
same run; prints texts/s, the ratio and how many answers are identical.

Usage:
  python bench/bench_respond.py --manifest data/corpus/train.jsonl   # embedded SmolLM2 on this CPU
  python bench/bench_respond.py --manifest M --texts 256 --in-flight 16 32 --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.llm import load_llm  # noqa: E402
from server.threads import on_own_thread  # noqa: E402
from training.responses import Answer, answer_texts  # noqa: E402


def answered(llm, texts: list[str], tokens: int, batch: int, engine: str) -> dict[str, Answer]:
    """`respond`'s own path (`answer_texts`) with a fresh cache, so every text is generated."""
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache.jsonl"
        return answer_texts(llm, texts, cache, None, tokens, batch, engine)


def timed(fn, *args) -> tuple[dict[str, Answer], float]:
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, required=True, help="texts to answer (.jsonl)")
    parser.add_argument("--texts", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=36, help="max new tokens per answer")
    parser.add_argument("--batch", type=int, default=32, help="generate's batch size")
    parser.add_argument("--in-flight", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--llm", default="default")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    lines = (json.loads(line) for line in args.manifest.open())
    texts = list(dict.fromkeys(line["text"] for line in lines))[: args.texts]
    llm = on_own_thread(load_llm, args.llm, args.device)  # as respond loads it
    answered(llm, texts[:4], 4, 4, "worker")  # warm-up: the engine's first start
    # generate on a thread that ends, like the worker's engine thread: one torch pool at a time
    reference, base_s = on_own_thread(
        timed, answered, llm, texts, args.tokens, args.batch, "generate"
    )
    rows = [(f"generate, batches of {args.batch}", base_s, len(texts))]
    for n in args.in_flight:
        answers, seconds = timed(answered, llm, texts, args.tokens, n, "worker")
        rows.append(
            (f"worker, {n} in flight", seconds, sum(answers[t] == reference[t] for t in texts))
        )
    print(f"{len(texts)} texts, up to {args.tokens} tokens each, {args.device}, "
          f"{torch.get_num_threads()} torch threads")  # fmt: skip
    print(f"{'engine':<28}{'s':>8}{'texts/s':>10}{'vs generate':>13}{'same answers':>14}")
    for name, seconds, same in rows:
        print(f"{name:<28}{seconds:>8.1f}{len(texts) / seconds:>10.2f}{base_s / seconds:>12.2f}x"
              f"{same:>9} / {len(texts)}")  # fmt: skip


if __name__ == "__main__":
    main()
