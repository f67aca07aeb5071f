"""Worker benchmark: decode speed vs model.generate and the bandwidth bound, audio-turn TTFT with
and without cache reuse, end-of-speech TTFT of audio streamed in real time with and without
prefilling it as it is heard, and aggregate throughput at 1, 4 and 16 concurrent sessions.

Audio turns are given as encoder outputs (random embeddings at a frame encoder's 12.5 a second),
so those TTFTs time the LLM alone; where espeak-ng is installed, spoken turns (real speech, the
loaded encoder run on it: the shipped one with the embedded default) add the product's TTFT.
The TTFT measurements live in bench/ttft.py.

Usage:
  python bench/bench_worker.py                                  # embedded SmolLM2 on this CPU
  python bench/bench_worker.py --dtype bfloat16 --threads 2
  python bench/bench_worker.py --llm llama2-7b-random --device cuda --tokenizer DIR
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.models import (  # noqa: E402
    REPEATS,
    STORY,
    add_model_args,
    build_ears,
    build_llm,
    bytes_per_token,
    generate_rate,
    measure_bandwidth,
)
from bench.speech import spoken_turns  # noqa: E402
from bench.ttft import (  # noqa: E402
    AUDIO_SECONDS,
    audio_ttft,
    run_request,
    spoken_ttft,
    streamed_ttft,
)
from model.speech_llm import SpeechLLM  # noqa: E402
from server.engine_forward import DECODE_STEPS  # noqa: E402
from server.threads import DEFAULT_THREADS, on_own_thread, single_threaded  # noqa: E402
from server.worker import Worker  # noqa: E402


async def single_stream(worker: Worker, n: int) -> dict[str, float]:
    """The median run of REPEATS single requests, by decode rate."""
    runs = [await run_request(worker, n, messages=STORY) for _ in range(REPEATS)]
    return sorted(runs, key=lambda r: r["rate"])[REPEATS // 2]


async def median_run(measure, *args) -> dict[str, float]:
    """The median of REPEATS runs of `measure(*args)`, by aggregate tokens/s."""
    runs = [await measure(*args) for _ in range(REPEATS)]
    return sorted(runs, key=lambda r: r["agg"])[REPEATS // 2]


async def concurrency(worker: Worker, sessions: int, n: int) -> dict[str, float]:
    sids = [worker.open_session() for _ in range(sessions)]
    for i, sid in enumerate(sids):
        text = f"Story {i}: tell me a long tale about a dragon and a baker."
        await worker.append_messages(sid, [{"role": "user", "content": text}])
    start = time.perf_counter()
    results = await asyncio.gather(*(run_request(worker, n, session_id=s) for s in sids))
    wall = time.perf_counter() - start
    for sid in sids:
        worker.close_session(sid)
    ttfts = sorted(r["ttft"] for r in results)
    return {
        "agg": sum(r["tokens"] for r in results) / wall,
        "p50": statistics.median(ttfts),
        "p99": ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))],
    }


async def bench_worker(
    speech_llm: SpeechLLM, args: argparse.Namespace, speeches: list[torch.Tensor]
) -> dict[str, object]:
    budget = int(args.kv_budget_gb * (1 << 30))
    worker = Worker(
        speech_llm,
        kv_budget_bytes=budget,
        max_batch=16,
        prefill_chunk=args.prefill_chunk,
        prefill_rows=args.prefill_rows,
        decode_step=args.decode_step,
        num_threads=args.threads,
    )
    await worker.start()
    await run_request(worker, 4, messages=STORY)  # warm-up
    single = await single_stream(worker, args.tokens)
    chained = worker.engine.chained
    worker.engine.launch_ahead = False  # each step waiting for the last one's tokens
    single["waiting"] = (await single_stream(worker, args.tokens))["rate"]
    worker.engine.launch_ahead = True
    single["chained"] = chained
    ttft = {}
    for measure in (audio_ttft, streamed_ttft):
        runs = [await measure(worker, speech_llm.llm, args.reply_tokens, s) for s in range(REPEATS)]
        ttft |= {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    spoken = {}
    if speeches:
        runs = [await spoken_ttft(worker, speeches, args.reply_tokens, r) for r in range(REPEATS)]
        spoken = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    if args.quick:
        await worker.stop()
        return {"single": single, "ttft": ttft, "spoken": spoken}
    conc = {s: await median_run(concurrency, worker, s, args.tokens) for s in (1, 4, 16)}
    matmuls = None  # CPU: 1 and 16 sessions again without the C++ kernels (torch ops)
    lean = worker.engine.lean
    if lean is not None and lean.attention_kernel is not None:
        kernel, lean.attention_kernel = lean.attention_kernel, None  # read between steps
        matmuls = {s: await median_run(concurrency, worker, s, args.tokens) for s in (1, 16)}
        lean.attention_kernel = kernel
    await worker.stop()
    # the same 16 sessions with prompts prefilled one at a time (no packed prefill)
    serial = Worker(
        speech_llm, kv_budget_bytes=budget, max_batch=16, prefill_chunk=args.prefill_chunk,
        prefill_rows=1, decode_step=args.decode_step, num_threads=args.threads,
    )  # fmt: skip
    await serial.start()
    await run_request(serial, args.tokens, messages=STORY)  # same cached prefix as above
    conc_serial = await median_run(concurrency, serial, 16, args.tokens)
    await serial.stop()
    # single stream again with the other decode steps (transformers' last: it re-lays weights)
    others = {}
    for step in [s for s in DECODE_STEPS if s not in (args.decode_step, "hf")] + ["hf"]:
        other = Worker(
            speech_llm, kv_budget_bytes=budget, max_batch=16, decode_step=step,
            num_threads=args.threads,
        )  # fmt: skip
        await other.start()
        await run_request(other, 4, messages=STORY)  # warm-up
        others[step] = await single_stream(other, args.tokens)
        await other.stop()
    return {
        "single": single, "ttft": ttft, "spoken": spoken, "conc": conc, "serial16": conc_serial,
        "others": others, "matmuls": matmuls,
    }  # fmt: skip


def spoken_table(spoken: dict[str, float], kind: str) -> list[tuple[str, str, str]]:
    """Rows for `spoken_ttft`'s figures (none when it did not run)."""
    if not spoken:
        return [("spoken turns: not measured (no espeak-ng)", "", "")]
    return [
        ("spoken 5 s turn (espeak-ng), encoder run on it:", "", f"the {kind} encoder"),
        ("  whole turn, TTFT turn 1 / turn 10 (ms)",
         f"{1e3 * spoken['whole1']:.1f} / {1e3 * spoken['whole10']:.1f}",
         f"encoder in; {spoken['prefilled1']:.0f} / {spoken['prefilled10']:.0f} positions "
         f"prefilled, over {spoken['cached10']:.0f} cached at turn 10"),
        ("  turn 10 / turn 1, whole turn", f"{spoken['whole10'] / spoken['whole1']:.2f}x",
         "<= 1.3x"),
        ("  streamed in real time, turn 1 / turn 10 (ms)",
         f"{1e3 * spoken['streamed1']:.1f} / {1e3 * spoken['streamed10']:.1f}",
         "end of speech to first text"),
        ("  turn 10 / turn 1, streamed", f"{spoken['streamed10'] / spoken['streamed1']:.2f}x",
         "<= 1.3x"),
    ]  # fmt: skip


def print_table(rows: list[tuple[str, str, str]]) -> None:
    print(f"{'metric':<52}{'value':>16}  target")
    for name, value, target in rows:
        print(f"{name:<52}{value:>16}  {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prefill-chunk", type=int, default=512, help="tokens per step, all rows")
    parser.add_argument("--prefill-rows", type=int, default=8, help="1: one prompt at a time")
    parser.add_argument("--reply-tokens", type=int, default=24, help="per reply in the session")
    parser.add_argument("--kv-budget-gb", type=float, default=2.0)
    parser.add_argument("--decode-step", choices=DECODE_STEPS, default="compiled")
    parser.add_argument(
        "--quick", action="store_true", help="single stream and TTFT only (no generate timing)"
    )
    parser.add_argument(
        "--hf-batch", type=int, default=None, help="also time generate on this many prompts at "
        "once (default: 16 on CUDA, none on CPU)",
    )  # fmt: skip
    args = parser.parse_args()
    device = torch.device(args.device)
    # as in the server: multi-threaded work off the event loop's thread, on threads that end
    # (server/threads.py), so the engine thread is the only one with an OpenMP pool
    llm = on_own_thread(build_llm, args, threads=args.threads)
    bandwidth = on_own_thread(measure_bandwidth, device, threads=args.threads)
    per_token = bytes_per_token(llm)
    bound = bandwidth / per_token
    hf = 0.0 if args.quick else on_own_thread(generate_rate, llm, args.tokens, threads=args.threads)
    hf_batch = args.hf_batch if args.hf_batch is not None else 16 * (device.type == "cuda")
    hf_batch = 0 if args.quick else hf_batch
    hf_batched = (
        on_own_thread(generate_rate, llm, args.tokens, hf_batch, threads=args.threads)
        if hf_batch
        else None
    )
    threads = args.threads or DEFAULT_THREADS
    gpu = device.type == "cuda"
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("server.engine_flashdecode").setLevel(logging.INFO)  # the timed choice
    single_threaded()
    ears = on_own_thread(build_ears, llm, args, threads=args.threads)
    # real speech where espeak-ng is installed (not on a bare GPU machine)
    speeches = spoken_turns(AUDIO_SECONDS) if shutil.which("espeak-ng") else []
    res = asyncio.run(bench_worker(SpeechLLM(llm, ears), args, speeches))
    spoken_rows = spoken_table(res["spoken"], ears.config.kind)
    if args.quick:
        single, ttft = res["single"], res["ttft"]
        print(f"\n{llm.name} on {args.device}, quick run")
        print(
            f"bandwidth {bandwidth / 1e9:.1f} GB/s, bound {bound:.1f} tok/s; single stream "
            f"{single['rate']:.1f} tok/s ({100 * single['rate'] / bound:.0f}% of bound; "
            f"{single['chained']} steps launched ahead); every step waiting for the last one's "
            f"tokens {single['waiting']:.1f} tok/s ({100 * single['waiting'] / bound:.0f}%)"
        )
        print(f"TTFT turn 1 {1e3 * ttft['reuse1']:.1f} "
              f"ms, turn 10 reuse {1e3 * ttft['reuse10']:.1f} ms, full {1e3 * ttft['full1']:.1f}"
              f" / {1e3 * ttft['full10']:.1f} ms; first token sampled {1e3 * ttft['token1']:.1f}"
              f" / {1e3 * ttft['token10']:.1f} ms")  # fmt: skip
        print(f"streamed 5 s turn, end of speech to first text, turn 1 / 10: prefilled as heard "
              f"{1e3 * ttft['heard1']:.1f} / {1e3 * ttft['heard10']:.1f} ms, at the commit "
              f"{1e3 * ttft['commit1']:.1f} / {1e3 * ttft['commit10']:.1f} ms")  # fmt: skip
        print_table(spoken_rows)
        return
    single, ttft, conc, serial16 = res["single"], res["ttft"], res["conc"], res["serial16"]
    where = torch.cuda.get_device_name(device) if gpu else f"{args.device}, {threads} threads"
    print(f"\n{llm.name} on {where} ({llm.dtype})")
    print(f"command: python {' '.join(sys.argv)}\n")
    ratio_t10 = ttft["reuse10"] / ttft["reuse1"]
    print_table([
        ("memory bandwidth (GB/s)", f"{bandwidth / 1e9:.1f}", ""),
        ("bytes read per token (MB)", f"{per_token / 1e6:.1f}", ""),
        ("bandwidth bound (tok/s)", f"{bound:.1f}", ""),
        ("model.generate decode (tok/s)", f"{hf:.1f}", ""),
        (f"worker single-stream decode, {args.decode_step} step (tok/s)", f"{single['rate']:.1f}",
         ">= 75% of bound" if gpu else ">= 2x generate, >= 50% of bound"),
        ("  worker / generate", f"{single['rate'] / hf:.2f}x", ""),
        ("  worker / bound", f"{100 * single['rate'] / bound:.0f}%", ""),
        *[(f"worker single stream, {step} step (tok/s)", f"{r['rate']:.1f}", "")
          for step, r in res["others"].items()],
        ("TTFT 5 s audio, turn 1 (ms)", f"{1e3 * ttft['reuse1']:.1f}",
         f"{ttft['prefilled1']:.0f} positions prefilled"),
        ("TTFT 5 s audio, turn 10, cache reuse (ms)", f"{1e3 * ttft['reuse10']:.1f}",
         f"{ttft['prefilled10']:.0f} prefilled over {ttft['cached10']:.0f} cached; "
         + ("<= 50 ms" if gpu else "<= 1.3x turn 1")),
        ("  first token sampled, turn 1 / turn 10 (ms)",
         f"{1e3 * ttft['token1']:.1f} / {1e3 * ttft['token10']:.1f}",
         "engine-side; the first text waits when that token is part of a character"),
        ("TTFT 5 s audio, turn 1, full re-prefill (ms)", f"{1e3 * ttft['full1']:.1f}", ""),
        ("TTFT 5 s audio, turn 10, full re-prefill (ms)", f"{1e3 * ttft['full10']:.1f}", ""),
        ("  turn 10 reuse / turn 1", f"{ratio_t10:.2f}x", "<= 1.3x"),
        ("streamed 5 s turn, end of speech to first text:", "", "real-time pushes, encoder in"),
        ("  prefilled as heard, turn 1 / turn 10 (ms)",
         f"{1e3 * ttft['heard1']:.1f} / {1e3 * ttft['heard10']:.1f}",
         "<= 50 ms" if gpu else ""),
        ("  prefilled at the commit, turn 1 / turn 10 (ms)",
         f"{1e3 * ttft['commit1']:.1f} / {1e3 * ttft['commit10']:.1f}", ""),
        ("  turn 10 / turn 1, prefilled as heard", f"{ttft['heard10'] / ttft['heard1']:.2f}x",
         "<= 1.3x"),
        *spoken_rows,
        *[
            row
            for s, c in conc.items()
            for row in (
                (f"{s:>2} sessions: aggregate (tok/s)", f"{c['agg']:.1f}",
                 (">= 2x HF batch-16 (619 on H200)" if gpu else ">= 6x single")
                 if s == 16 else ""),
                (f"{s:>2} sessions: TTFT p50 / p99 (ms)",
                 f"{1e3 * c['p50']:.0f} / {1e3 * c['p99']:.0f}", ""),
            )
        ],
        ("  16 sessions / single stream", f"{conc[16]['agg'] / conc[1]['agg']:.1f}x", ""),
        *([(f"model.generate, {hf_batch} prompts at once (tok/s)", f"{hf_batched:.1f}", ""),
           (f"  16 sessions / generate on {hf_batch}", f"{conc[16]['agg'] / hf_batched:.2f}x",
            ">= 2x" if gpu else "")] if hf_batched else []),
        ("16 sessions, one prompt per prefill step (tok/s)", f"{serial16['agg']:.1f}", ""),
        ("  TTFT p50 / p99 (ms)",
         f"{1e3 * serial16['p50']:.0f} / {1e3 * serial16['p99']:.0f}", ""),
        *([("torch ops (attention as batched matmuls), not the C++ kernels:", "",
            "server/cpu_attention.py"),
           ("   1 / 16 sessions: aggregate (tok/s)",
            f"{mm[1]['agg']:.1f} / {mm[16]['agg']:.1f}", ""),
           ("  16 sessions / single stream", f"{mm[16]['agg'] / mm[1]['agg']:.1f}x", "")]
          if (mm := res["matmuls"]) else []),
    ])  # fmt: skip


if __name__ == "__main__":
    main()
