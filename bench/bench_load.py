"""Load times of the embedded default LLM: first load (GGUF dequantized) vs the cached load.

Usage: python bench/bench_load.py   (uses a fresh temporary cache folder for the first load)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

CHILD = """
import time, logging
t0 = time.perf_counter()
from model.llm import load_llm
t1 = time.perf_counter()
llm = load_llm("default")
t2 = time.perf_counter()
print(f"{t1 - t0:.2f} {t2 - t1:.2f}")
"""


def time_load(cache: str) -> tuple[float, float]:
    """(import seconds, load_llm seconds) in a fresh interpreter."""
    env = {**os.environ, "SPEECHCHAT_CACHE": cache, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True
    )
    imp, load = out.stdout.split()[-2:]
    return float(imp), float(load)


def main() -> None:
    with tempfile.TemporaryDirectory() as cache:
        rows = [("first (GGUF -> safetensors)", *time_load(cache))]
        rows += [(f"cached #{i}", *time_load(cache)) for i in (1, 2)]
    print(f"{'load':<30}{'import s':>10}{'load_llm s':>12}")
    for name, imp, load in rows:
        print(f"{name:<30}{imp:>10.2f}{load:>12.2f}")
    print(f"cached / first: {rows[1][2] / rows[0][2]:.3f}")


if __name__ == "__main__":
    main()
