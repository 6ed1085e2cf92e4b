"""PNG plots (matplotlib, headless): per-digit error rates, heat maps, curves."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["plot_error_rates", "plot_heatmap", "plot_curve", "plot_bars", "plot_merge_study"]


def _pyplot():  # imported lazily: matplotlib costs ~0.3 s at start-up and most commands never plot
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_error_rates(series: dict[str, Sequence[float]], path: str | os.PathLike[str], *, title: str = "Error rate per digit") -> Path:
    """Grouped bars: one group per digit 0..9, one bar per named series (e.g. before/after LoRA)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    k = len(series)
    width = 0.8 / max(k, 1)
    for i, (label, rates) in enumerate(series.items()):
        ax.bar([d - 0.4 + width * (i + 0.5) for d in range(10)], list(rates), width, label=label)
    ax.set_xticks(range(10))
    ax.set_xlabel("digit")
    ax.set_ylabel("error rate")
    ax.set_title(title)
    if k > 1:
        ax.legend()
    return _save(fig, path)


def plot_heatmap(
    matrix: Sequence[Sequence[float]],
    path: str | os.PathLike[str],
    *,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str,
) -> Path:
    """A labelled heat map with the value written in each cell."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1 + 0.7 * len(col_labels), 1 + 0.5 * len(row_labels)))
    im = ax.imshow(matrix, cmap="magma_r", aspect="auto")
    ax.set_xticks(range(len(col_labels)), labels=list(col_labels))
    ax.set_yticks(range(len(row_labels)), labels=list(row_labels))
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=6, color="grey")
    fig.colorbar(im, ax=ax)
    ax.set_title(title)
    return _save(fig, path)


def plot_curve(
    xs: Sequence[float],
    series: dict[str, Sequence[float]],
    path: str | os.PathLike[str],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = False,
) -> Path:
    """Lines over a shared x axis."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, ys in series.items():
        ax.plot(list(xs), list(ys), marker="o", label=label)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)


def plot_bars(values: dict[str, float], path: str | os.PathLike[str], *, ylabel: str, title: str, logy: bool = False) -> Path:
    """One bar per named value."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(list(values), list(values.values()))
    if logy:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _save(fig, path)


def plot_merge_study(result: dict, path: str | os.PathLike[str]) -> Path:
    """Test accuracy vs density per method, each density at the scale validation chose for it, with
    the base's accuracy as a dashed line. Each method's chosen merge is a star; task arithmetic keeps
    every entry (one point, at density 1), drawn as a diamond."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method in dict.fromkeys(row["method"] for row in result["curve"]):
        rows = sorted((r for r in result["curve"] if r["method"] == method), key=lambda r: r["density"])
        marker = "D" if len(rows) == 1 else "o"
        (line,) = ax.plot([r["density"] for r in rows], [r["test_accuracy"] for r in rows], marker=marker, label=method)
        chosen = result["chosen"].get(method)
        if chosen is not None:
            ax.plot([chosen["density"]], [chosen["test"]["accuracy"]], marker="*", markersize=14, color=line.get_color(), linestyle="none")
    ax.axhline(result["base"]["test"]["accuracy"], color="grey", linestyle="--", label="base")
    ax.set_xscale("log")
    ax.set_xlabel("density (share of each delta's entries kept)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"Ten digit adapters merged into one (rank {result['r']}); star: chosen on validation", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)
