"""PNG plots (matplotlib, headless): per-digit errors, change-against-base heat maps, curves with the
test set's noise band, savings.

Each picture is drawn to be read at a glance: one quantity per axis with its unit, a title that says
the finding, changes drawn against the base (blue fewer errors, red more), the sampling noise of the
test set drawn where points differ by a handful of images, and legends outside the data.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "Z95",
    "binomial_halfwidth",
    "change_against_base",
    "plot_error_rates",
    "plot_error_change",
    "plot_heatmap",
    "plot_change_heatmap",
    "plot_curve",
    "plot_svd_sweep",
    "plot_savings",
    "plot_merge_study",
]

Z95 = 1.959964  # the normal quantile of a two-sided 95% interval
BAND_COLOUR = "0.85"  # light grey: the noise band sits behind the data without hiding it
FEWER, MORE = "#2166ac", "#b2182b"  # the diverging map's ends (RdBu_r): blue fewer errors, red more
# below the x label, outside the data (the right side holds the second y axis)
_LEGEND_BELOW = {"loc": "upper center", "bbox_to_anchor": (0.5, -0.2), "ncol": 3, "fontsize": 8, "frameon": False}


def _pyplot():  # imported lazily: matplotlib costs ~0.3 s at start-up and most commands never plot
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    # bbox_inches="tight" keeps a legend placed outside the axes inside the picture
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def binomial_halfwidth(accuracy: float, n: int, *, z: float = Z95) -> float:
    """Half the width of the normal-approximation binomial interval of an accuracy measured on ``n``
    images: how far a fresh test set of the same size would move it (95% for the default ``z``)."""
    return z * math.sqrt(max(accuracy * (1 - accuracy), 0.0) / n)


def change_against_base(rows: Sequence[Sequence[float]], base: Sequence[float]) -> tuple[list[list[float]], float]:
    """Each row minus ``base``, cell by cell, and the symmetric colour limit for it (the largest
    absolute change, at least 1 so that an all-zero matrix still has a scale).

    >>> change_against_base([[3, 5], [4, 4]], [4, 4])
    ([[-1, 1], [0, 0]], 1)
    """
    change = [[v - b for v, b in zip(row, base, strict=True)] for row in rows]
    limit = max([abs(v) for row in change for v in row] + [1])
    return change, limit


def _text_colour(rgba: Sequence[float]) -> str:
    """Black on a light cell, white on a dark one (by the cell's relative luminance, WCAG's weights
    on linearised sRGB; 0.18 is where black and white text have equal contrast)."""

    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(c) for c in rgba[:3])
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.18 else "white"


def _signed(v: float) -> str:
    return "0" if v == 0 else (f"{v:+.0f}" if float(v).is_integer() else f"{v:+.3g}")


def plot_error_rates(series: dict[str, Sequence[float]], path: str | os.PathLike[str], *, title: str = "Error rate per digit") -> Path:
    """Grouped bars: one group per digit 0..9, one bar per named series (e.g. before/after LoRA)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    k = len(series)
    width = 0.8 / max(k, 1)
    for i, (label, rates) in enumerate(series.items()):
        ax.bar([d - 0.4 + width * (i + 0.5) for d in range(10)], list(rates), width, label=label)
    ax.set_xticks(range(10))
    ax.set_xlabel("test digit")
    ax.set_ylabel("error rate (share of the digit's test images)")
    ax.set_title(title)
    if k > 1:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    return _save(fig, path)


def plot_error_change(base_wrong: Sequence[int], wrong: Sequence[int], path: str | os.PathLike[str], *, digit: int, label: str) -> Path:
    """One adapter against its base, per test digit: the change in the number of test images it gets
    wrong (one quantity, one axis, each bar labelled), its own digit's bar marked. The title adds up
    the fix and the side effects so that neither is judged from bar heights alone."""
    plt = _pyplot()
    change = [w - b for w, b in zip(wrong, base_wrong, strict=True)]
    side = sum(c for d, c in enumerate(change) if d != digit)
    fig, ax = plt.subplots(figsize=(8, 4))
    colours = [FEWER if c < 0 else MORE for c in change]
    bars = ax.bar(range(10), change, color=colours, edgecolor=["black" if d == digit else "none" for d in range(10)], linewidth=1.5)
    ax.bar_label(bars, labels=[_signed(c) for c in change], padding=2, fontsize=8)
    ax.axhline(0, color="black", linewidth=0.8)
    limit = max([abs(c) for c in change] + [1])
    ax.set_ylim(-1.25 * limit, 1.25 * limit)  # symmetric: a rise and a fall of one size look alike
    ax.set_xticks(range(10), labels=[f"{d}\n({b})" for d, b in enumerate(base_wrong)])
    ax.set_xlabel(f"test digit (the base's wrong count); outlined: digit {digit}, the adapter's own")
    ax.set_ylabel("change in test images wrong vs base")
    ax.set_title(
        f"{label}: digit {digit} {base_wrong[digit]} → {wrong[digit]} wrong ({_signed(change[digit])}); "
        f"the other nine {_signed(side)} in all",
        fontsize=10,
    )
    return _save(fig, path)


def plot_heatmap(
    matrix: Sequence[Sequence[float]],
    path: str | os.PathLike[str],
    *,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str,
) -> Path:
    """A labelled heat map of absolute values with the value written in each cell (black or white,
    whichever reads on the cell). For changes against a base use :func:`plot_change_heatmap`."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1 + 0.7 * len(col_labels), 1 + 0.5 * len(row_labels)))
    im = ax.imshow(matrix, cmap="magma_r", aspect="auto")
    ax.set_xticks(range(len(col_labels)), labels=list(col_labels))
    ax.set_yticks(range(len(row_labels)), labels=list(row_labels))
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=7, color=_text_colour(im.cmap(im.norm(v))))
    fig.colorbar(im, ax=ax)
    ax.set_title(title)
    return _save(fig, path)


def plot_change_heatmap(
    rows: Sequence[Sequence[float]],
    base: Sequence[float],
    path: str | os.PathLike[str],
    *,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str,
    unit: str = "test images wrong",
) -> Path:
    """Each row's change against ``base`` per column (e.g. wrong counts per test digit for each
    adapter): a diverging map centred on zero with symmetric limits (blue fewer errors, red more,
    white no change), the signed change in each cell in black or white by the cell's luminance, and
    the base's own value under each column label."""
    plt = _pyplot()
    change, limit = change_against_base(rows, base)
    fig, ax = plt.subplots(figsize=(1.5 + 0.7 * len(col_labels), 1.2 + 0.5 * len(row_labels)))
    im = ax.imshow(change, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(len(col_labels)), labels=[f"{c}\n({b:g})" for c, b in zip(col_labels, base, strict=True)])
    ax.set_yticks(range(len(row_labels)), labels=list(row_labels))
    ax.set_xlabel(f"test digit (below it: the base's {unit})")
    for i, row in enumerate(change):
        for j, v in enumerate(row):
            ax.text(j, i, _signed(v), ha="center", va="center", fontsize=8, color=_text_colour(im.cmap(im.norm(v))))
    bar = fig.colorbar(im, ax=ax)
    bar.set_label(f"change in {unit} vs base\n(blue: fewer errors, red: more errors)")
    ax.set_title(title, fontsize=10)
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
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    return _save(fig, path)


def _noise_band(ax, xs: Sequence[float], base_accuracy: float, n: int) -> float:
    """The base's 95% binomial interval as a grey band across the (log) x range of ``xs``, the base
    as a dashed line, test images wrong on the right axis, and y-limits that hold the band and every
    line; returns the half-width."""
    half = binomial_halfwidth(base_accuracy, n)
    x0, x1 = min(xs) / 1.3, max(xs) * 1.3  # a margin on the log axes both plots use
    ax.fill_between(
        [x0, x1],
        base_accuracy - half,
        base_accuracy + half,
        color=BAND_COLOUR,
        zorder=0,
        label=f"noise: the base's 95% interval\non {n:,} test images (±{half * n:.0f} images)",
    )
    ax.axhline(base_accuracy, color="grey", linestyle="--", label="base", zorder=1)
    ax.set_xlim(x0, x1)
    ys = [float(y) for line in ax.lines for y in line.get_ydata()] + [base_accuracy - half, base_accuracy + half]
    pad = 0.1 * (max(ys) - min(ys))
    ax.set_ylim(min(ys) - pad, max(ys) + pad)
    ax.ticklabel_format(axis="y", useOffset=False)  # 0.9868, not an offset of +9.868e-1
    ax.set_ylabel("test accuracy")
    right = ax.secondary_yaxis("right", functions=(lambda a: (1 - a) * n, lambda w: 1 - w / n))
    right.set_ylabel(f"test images wrong (of {n:,})")
    return half


def _noise_verdict(values: Sequence[float], base_accuracy: float, half: float) -> str:
    outside = sum(abs(v - base_accuracy) > half for v in values)
    if outside == 0:
        return "all within the test set's noise (grey)"
    return f"{outside} of {len(values)} outside the test set's noise (grey)"


def plot_svd_sweep(sweep: dict, path: str | os.PathLike[str], *, n_test: int) -> Path:
    """Test accuracy of the LoRA taken by SVD from a full fine-tune, per rank (``rank_sweep``'s
    result), beside the full fine-tune and the base, over the base's 95% binomial interval on
    ``n_test`` images: differences inside the band are the test set's noise."""
    plt = _pyplot()
    ranks = [r["r"] for r in sweep["rows"]]
    accuracies = [r["accuracy"] for r in sweep["rows"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.set_xscale("log", base=2)
    ax.plot(ranks, accuracies, marker="o", label="LoRA by SVD of the fine-tune", zorder=3)
    ax.axhline(sweep["full"]["accuracy"], color="tab:orange", label="full fine-tune", zorder=2)
    half = _noise_band(ax, ranks, sweep["base"]["accuracy"], n_test)
    ax.set_xticks(ranks, labels=[str(r) for r in ranks])
    ax.set_xlabel("rank r")
    verdict = _noise_verdict([*accuracies, sweep["full"]["accuracy"]], sweep["base"]["accuracy"], half)
    ax.set_title(f"Digit {sweep['digit']}: accuracy vs SVD rank, {verdict}", fontsize=10)
    ax.legend(**_LEGEND_BELOW)
    return _save(fig, path)


def plot_savings(panels: dict[str, dict[str, float]], path: str | os.PathLike[str], *, title: str) -> Path:
    """One panel per quantity (its name is the panel's y label, e.g. "parameters"), bars on a linear
    axis each labelled with its value and its share of the panel's first bar (the base)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False)
    for ax, (quantity, values) in zip(axes[0], panels.items(), strict=True):
        reference = next(iter(values.values()))
        bars = ax.bar(list(values), list(values.values()), color=["tab:grey"] + ["tab:blue"] * (len(values) - 1))
        labels = [f"{v:,.0f}" + ("" if i == 0 else f"\n{100 * v / reference:.2f}%\nof the base") for i, v in enumerate(values.values())]
        ax.bar_label(bars, labels=labels, padding=2, fontsize=8)
        ax.set_ylim(0, 1.2 * max(values.values()))
        ax.set_ylabel(quantity)
        ax.ticklabel_format(axis="y", style="plain")
        ax.yaxis.set_major_formatter(lambda v, _: f"{v:,.0f}")
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def plot_merge_study(result: dict, path: str | os.PathLike[str]) -> Path:
    """Test accuracy vs density per method, each density at the scale validation chose for it, over
    the base's 95% binomial interval on the test set (dashed: the base). Each method's chosen merge
    is a star; task arithmetic keeps every entry (one point, at density 1), drawn as a diamond."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.set_xscale("log")
    points = []
    for method in dict.fromkeys(row["method"] for row in result["curve"]):
        rows = sorted((r for r in result["curve"] if r["method"] == method), key=lambda r: r["density"])
        marker = "D" if len(rows) == 1 else "o"
        (line,) = ax.plot([r["density"] for r in rows], [r["test_accuracy"] for r in rows], marker=marker, label=method, zorder=3)
        points += [r["test_accuracy"] for r in rows]
        chosen = result["chosen"].get(method)
        if chosen is not None:
            ax.plot(
                [chosen["density"]],
                [chosen["test"]["accuracy"]],
                marker="*",
                markersize=14,
                color=line.get_color(),
                linestyle="none",
                zorder=4,
            )
    test = result["base"]["test"]
    half = _noise_band(ax, [r["density"] for r in result["curve"]], test["accuracy"], test["n"])
    ax.set_xlabel("density (share of each delta's entries kept)")
    verdict = _noise_verdict(points, test["accuracy"], half)
    ax.set_title(
        f"Ten digit adapters merged into one (rank {result['r']}): {verdict}\nstar: each method's merge chosen on validation", fontsize=10
    )
    ax.legend(**_LEGEND_BELOW)
    return _save(fig, path)
