"""Figures logged to MLflow: loss and recall curves, Tune scatter plots, similarity heatmaps."""

from __future__ import annotations

import math
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def training_curves(history: Sequence[dict[str, float]]):
    """Left: training loss and its terms per epoch. Right: val R@1/5/10 in both directions."""
    epochs = [h["epoch"] + 1 for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key in sorted(k for k in history[0] if k.startswith("train_") and k != "train_grad_norm"):
        left.plot(epochs, [h[key] for h in history], marker="o", label=key.removeprefix("train_"))
    left.set(xlabel="epoch", ylabel="loss", title="training loss")
    left.legend(fontsize=8)
    for direction, style in (("t2v", "-"), ("v2t", "--")):
        for k in (1, 5, 10):
            key = f"val_{direction}_R{k}"
            if key in history[0]:
                right.plot(epochs, [h[key] for h in history], style, marker="o", label=f"{direction} R@{k}")
    right.set(xlabel="epoch", ylabel="recall (%)", title="validation recall", ylim=(0, 100))
    right.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return fig


def metric_vs_params(trials: Sequence[dict[str, Any]], params: Sequence[str], metric: str, log_params: set[str]):
    """One scatter per hyperparameter: the metric of every trial against its value."""
    cols = min(3, len(params))
    rows = math.ceil(len(params) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, params):
        xs = [t[name] for t in trials if t.get(metric) is not None]
        ys = [t[metric] for t in trials if t.get(metric) is not None]
        ax.scatter(xs, ys)
        ax.set(xlabel=name, ylabel=metric, xscale="log" if name in log_params else "linear")
    for ax in list(axes.flat)[len(params):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def trial_curves(curves: dict[str, Sequence[float]], rungs: Sequence[int], metric: str):
    """Left: each trial's metric per epoch, with the scheduler's rungs (the epochs at which ASHA
    compares trials) as vertical lines. Right: the metric of every trial that reached each rung,
    so what the scheduler kept and stopped can be read at a glance."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, values in curves.items():
        left.plot(range(1, len(values) + 1), values, marker="o", markersize=3, alpha=0.8, label=name)
    for rung in rungs:
        left.axvline(rung, color="grey", linestyle=":", linewidth=1)
    left.set(xlabel="epoch", ylabel=metric, title="trials per epoch (dotted: rungs)")
    if len(curves) <= 12:
        left.legend(fontsize=7)
    for i, rung in enumerate(rungs):
        reached = [values[rung - 1] for values in curves.values() if len(values) >= rung]
        right.scatter([i] * len(reached), reached, alpha=0.7)
    right.set(xticks=range(len(rungs)), xticklabels=[str(r) for r in rungs], xlabel="rung (epoch)",
              ylabel=metric, title="trials at each rung")
    fig.tight_layout()
    return fig


def similarity_heatmap(sim: np.ndarray, title: str, max_items: int = 32):
    """Text-to-video similarities of the first items; a good model has a bright diagonal."""
    sim = np.asarray(sim)[:max_items, :max_items]
    fig, ax = plt.subplots(figsize=(5, 4.4))
    image = ax.imshow(sim, cmap="viridis")
    ax.set(xlabel="video", ylabel="caption", title=title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def middle_frame(path: str, size: int = 160) -> np.ndarray | None:
    """A video's middle frame (uint8 [size, size, 3]), or None when it cannot be decoded."""
    from core.video import VideoDecodeError, decode_video

    try:
        frames, mask = decode_video(path, 3, size)
    except (VideoDecodeError, OSError):
        return None
    return frames[1] if mask[1] else frames[0]


def contact_sheet(hits: Sequence[Any], query: str, columns: int = 5):
    """The hits' middle frames in rank order, each titled with its rank, id and score."""
    rows = max(1, math.ceil(len(hits) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.7 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, hit in zip(axes.flat, hits):
        frame = middle_frame(hit.path)
        if frame is not None:
            ax.imshow(frame)
        else:
            ax.text(0.5, 0.5, "not decodable", ha="center", va="center", fontsize=8)
        ax.set_title(f"{hit.rank}. {hit.video_id}\n{hit.score:.3f}", fontsize=8)
    fig.suptitle(f"“{query}”", fontsize=10)
    fig.tight_layout()
    return fig
