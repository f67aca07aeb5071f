"""Figures a person would rather look at than read: loss curves and evaluation bars."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

SMOOTHING = 0.9  # exponential moving average weight for the training curve


def smooth(values: list[float], weight: float = SMOOTHING) -> list[float]:
    out, last = [], values[0] if values else 0.0
    for v in values:
        last = weight * last + (1 - weight) * v
        out.append(last)
    return out


def plot_curves(log_path: Path, out_png: Path, title: str = "training") -> Path:
    """Training loss (smoothed) and every `dev_*` figure against step, from a run's log.jsonl."""
    if not Path(log_path).is_file():
        return out_png  # nothing trained yet, nothing to draw
    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line]
    fig, ax = plt.subplots(figsize=(7, 4))
    trained = [r for r in records if "loss" in r]  # a run may log a dev figure before step 1
    steps = [r["step"] for r in trained]
    ax.plot(steps, smooth([r["loss"] for r in trained]), label="train loss (smoothed)")
    if any("kl" in r for r in trained):
        ax.plot(steps, smooth([r.get("kl", 0.0) for r in trained]), label="train KL (smoothed)")
    dev_keys = sorted({k for r in records for k in r if k.startswith("dev_")})
    for key in dev_keys:
        points = [(r["step"], r[key]) for r in records if key in r]
        ax.plot(*zip(*points, strict=True), "o-", label=key.replace("_", " "))
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token); dev WER as a fraction")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def plot_bars(values: dict[str, float], title: str, ylabel: str, out_png: Path) -> Path:
    """One bar per system (e.g. text / end-to-end / cascade)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52"][: len(values)]
    bars = ax.bar(list(values), list(values.values()), color=colors)
    ax.bar_label(bars, fmt="%.2f")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png
