"""The model under test and the machine's baselines, shared by the benchmarks: which LLM and
where (the embedded default, an HF directory, or a random-weight Llama-2-7B shape), an encoder
to go with it, memory bandwidth, bytes read per token, and `model.generate`'s decode rate.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from model.checkpoint import load_encoder_spec  # noqa: E402
from model.config import encoder_preset  # noqa: E402
from model.encoders import AudioEncoder, build_encoder  # noqa: E402
from model.llm import LoadedLLM, load_llm, pick_attention  # noqa: E402
from model.messages import TextPart, Turn  # noqa: E402
from model.prompt import render_prompt, text_only_ids  # noqa: E402

REPEATS = 3  # every benchmark figure is the median of this many runs
LLAMA2_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
)
STORY = [Turn("user", (TextPart("Write a very long story about a dragon who learns to bake."),))]


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The LLM to measure and where: the options `build_llm` reads, and torch threads."""
    parser.add_argument("--llm", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--tokenizer", default=None, help="tokenizer dir for llama2-7b-random")
    parser.add_argument("--layers", type=int, default=None, help="shrink llama2-7b-random")
    parser.add_argument("--threads", type=int, default=None)


def build_llm(args: argparse.Namespace) -> LoadedLLM:
    if args.llm != "llama2-7b-random":
        return load_llm(args.llm, device=args.device, dtype=args.dtype)
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    device = torch.device(args.device)
    shape = {**LLAMA2_7B, "num_hidden_layers": args.layers or LLAMA2_7B["num_hidden_layers"]}
    config = LlamaConfig(vocab_size=len(tokenizer), **shape)
    config._attn_implementation = pick_attention(device)
    dtype = getattr(torch, args.dtype or "bfloat16")
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval().requires_grad_(False)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return LoadedLLM(model=model, tokenizer=tokenizer, name="llama2-7b-random")


def build_ears(llm: LoadedLLM, args: argparse.Namespace) -> AudioEncoder:
    """The shipped encoder with the default LLM; otherwise a random conformer of the LLM's width
    (for timing, its cost is what counts)."""
    if args.llm == "default":
        return load_encoder_spec("default", llm)[0]
    torch.manual_seed(0)
    return build_encoder(encoder_preset("small", llm_hidden=llm.hidden_size))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_bandwidth(device: torch.device) -> float:
    """Bytes/s of streaming memory reads (sum) or copies (read+write), whichever is higher."""
    n = (1 << 30) // 4 if device.type == "cuda" else (256 << 20) // 4
    x = torch.randn(n, device=device)
    y = torch.empty_like(x)
    best = 0.0
    for op, moved in ((lambda: x.sum(), 4 * n), (lambda: y.copy_(x), 8 * n)):
        op()
        sync(device)
        t = time.perf_counter()
        for _ in range(10):
            op()
        sync(device)
        best = max(best, 10 * moved / (time.perf_counter() - t))
    return best


def bytes_per_token(llm: LoadedLLM) -> int:
    """Weights read per decode step: all parameters, less an untied input table (one row read)."""
    model = llm.model
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    if emb is not model.get_output_embeddings().weight:
        total -= emb.numel() * emb.element_size()
    return total


@torch.inference_mode()
def generate_rate(llm: LoadedLLM, n: int, batch: int = 1) -> float:
    """model.generate's decode tokens/s over `batch` copies of one prompt: batch (n - 1) tokens
    over t(n) - t(1)."""
    ids = torch.tensor([text_only_ids(render_prompt(llm.tokenizer, STORY))], device=llm.device)
    ids = ids.expand(batch, -1)  # [batch, T]

    def timed(k: int) -> float:
        sync(llm.device)
        t = time.perf_counter()
        llm.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=k, min_new_tokens=k,
            do_sample=False, pad_token_id=llm.eos_token_ids[0],
        )  # fmt: skip
        sync(llm.device)
        return time.perf_counter() - t

    timed(2)
    return statistics.median(batch * (n - 1) / (timed(n) - timed(1)) for _ in range(REPEATS))
