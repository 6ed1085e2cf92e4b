"""The demo's pictures read correctly at a glance: changes against the base on a diverging map centred
on zero with readable cell text, the test set's noise drawn on the SVD and merge plots, one quantity
per axis with value labels, legends outside the data. Each figure is built from small synthetic data
and inspected as matplotlib drew it (captured at save time)."""

from __future__ import annotations

from pathlib import Path
from statistics import NormalDist

import pytest

import mnist_peft.experiments.plots as plots

BASE_WRONG = [6, 8, 11, 11, 21, 16, 15, 14, 13, 17]  # the reference base's wrong count per test digit
N_TEST = 10_000


@pytest.fixture
def drawn(monkeypatch) -> list:
    """The figures the plot functions save, drawn and still open for inspection."""
    figures = []
    save = plots._save

    def capture(fig, path):
        result = save(fig, path)  # lays the figure out and draws it, as the PNG has it
        figures.append(fig)
        return result

    monkeypatch.setattr(plots, "_save", capture)
    return figures


def _luminance(colour: str) -> float:
    from matplotlib.colors import to_rgb

    return sum(w * c for w, c in zip((0.2126, 0.7152, 0.0722), to_rgb(colour), strict=True))


def _bands(ax) -> list:
    from matplotlib.collections import PolyCollection

    return [c for c in ax.collections if isinstance(c, PolyCollection)]


def _legend_is_outside(fig, ax) -> bool:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()  # closing the figure took its canvas
    legend = ax.get_legend()
    return legend is not None and not legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))


def _sweep(accuracies: list[float]) -> dict:
    rows = [
        {"r": r, "parameters": 6794 * r, "accuracy": a, "wrong_per_digit": BASE_WRONG}
        for r, a in zip((1, 2, 4, 8), accuracies, strict=True)
    ]
    return {"digit": 9, "base": {"accuracy": 0.9868}, "full": {"accuracy": 0.9864, "parameters": 2_807_010}, "rows": rows}


def _merge_result(accuracies: list[float]) -> dict:
    densities = [0.01, 0.1, 1.0][: len(accuracies)]
    curve = [{"method": "ties", "density": d, "scale": 1.0, "test_accuracy": a} for d, a in zip(densities, accuracies, strict=True)]
    curve.append({"method": "task_arithmetic", "density": 1.0, "scale": 0.1, "test_accuracy": 0.9868})
    chosen = {"ties": {"density": 0.1, "test": {"accuracy": accuracies[1]}}}
    return {"r": 4, "curve": curve, "chosen": chosen, "base": {"test": {"accuracy": 0.9868, "n": N_TEST}}}


def test_the_band_is_the_binomial_95_percent_interval() -> None:
    assert pytest.approx(NormalDist().inv_cdf(0.975), abs=1e-6) == plots.Z95
    assert plots.binomial_halfwidth(0.5, 100) == pytest.approx(plots.Z95 * 0.05)
    assert round(plots.binomial_halfwidth(0.9868, N_TEST) * N_TEST) == 22  # the demo's ±22 images
    assert plots.binomial_halfwidth(1.0, N_TEST) == 0.0


def test_change_against_base_is_each_row_minus_the_base_with_symmetric_limits() -> None:
    change, limit = plots.change_against_base([[6, 12, 9], [4, 10, 11]], [6, 10, 10])
    assert change == [[0, 2, -1], [-2, 0, 1]] and limit == 2
    assert plots.change_against_base([[1, 1]], [1, 1]) == ([[0, 0]], 1)  # no change: still a scale


def test_heat_map_shows_the_change_against_the_base_on_a_diverging_map_centred_on_zero(tmp_path: Path, drawn) -> None:
    rows = [list(BASE_WRONG) for _ in range(3)]
    rows[0][0] += 2
    rows[1][9] -= 7
    rows[2][4] += 5
    plots.plot_change_heatmap(
        rows, BASE_WRONG, tmp_path / "heat.png", row_labels=["a", "b", "c"], col_labels=[str(d) for d in range(10)], title="t"
    )
    (fig,) = drawn
    ax = fig.axes[0]
    (image,) = ax.images
    assert image.get_array().tolist()[1][9] == -7 and image.get_array().tolist()[0][1] == 0
    norm = image.norm
    assert norm.vmin == -norm.vmax == -7  # zero sits in the middle of the map, white
    cmap = image.get_cmap()
    blue_end, middle, red_end = cmap(0.0), cmap(0.5), cmap(1.0)
    assert blue_end[2] > blue_end[0] and red_end[0] > red_end[2]  # fewer errors blue, more red
    assert min(middle[:3]) > 0.9  # a light, neutral centre: "no change" carries no colour
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert texts[(1, 9)] == "-7" and texts[(2, 4)] == "+5" and texts[(0, 1)] == "0"
    label = fig.axes[1].get_ylabel()
    assert "fewer errors" in label and "more errors" in label


def test_cell_text_is_dark_on_a_light_cell_and_light_on_a_dark_one(tmp_path: Path, drawn) -> None:
    rows = [list(BASE_WRONG), list(BASE_WRONG)]
    rows[1][9] -= 8  # the darkest blue
    plots.plot_change_heatmap(
        rows, BASE_WRONG, tmp_path / "change.png", row_labels=["a", "b"], col_labels=[str(d) for d in range(10)], title="t"
    )
    # the absolute map the web app draws today, too: its darkest cell is its largest value
    plots.plot_heatmap([[0.001, 0.5], [0.2, 0.03]], tmp_path / "abs.png", row_labels=["a", "b"], col_labels=["0", "1"], title="t")
    for fig, dark, light in ((drawn[0], (1, 9), (0, 0)), (drawn[1], (0, 1), (0, 0))):
        colour = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_color() for t in fig.axes[0].texts}
        assert _luminance(colour[dark]) > 0.8 > 0.2 > _luminance(colour[light])


def test_savings_draws_one_quantity_per_axis_on_a_linear_scale_with_every_bar_labelled(tmp_path: Path, drawn) -> None:
    panels = {
        "parameters": {"base": 2_807_010, "seed LoRA r=1": 6_794, "replay LoRA r=4": 27_176},
        "file size (bytes)": {"base file": 11_228_536, "adapter file": 109_520},
    }
    plots.plot_savings(panels, tmp_path / "savings.png", title="t")
    (fig,) = drawn
    assert [ax.get_ylabel() for ax in fig.axes] == ["parameters", "file size (bytes)"]
    for ax, values in zip(fig.axes, panels.values(), strict=True):
        assert ax.get_yscale() == "linear"
        assert [t.get_text().split("\n")[0] for t in ax.texts] == [f"{v:,}" for v in values.values()]
    assert fig.axes[0].texts[1].get_text() == "6,794\n0.24%\nof the base"


def test_the_replay_chart_draws_changes_in_images_with_fix_and_side_effects_added_up(tmp_path: Path, drawn) -> None:
    after = [6, 8, 11, 14, 26, 17, 15, 17, 18, 10]  # the replay digit-9 adapter's: 9 fixed by 7, +17 elsewhere
    plots.plot_error_change(BASE_WRONG, after, tmp_path / "replay.png", digit=9, label="digit-9 LoRA")
    (fig,) = drawn
    (ax,) = fig.axes
    heights = [bar.get_height() for bar in ax.patches]
    assert heights == [a - b for a, b in zip(after, BASE_WRONG, strict=True)]
    assert [t.get_text() for t in ax.texts] == ["0", "0", "0", "+3", "+5", "+1", "0", "+3", "+5", "-7"]
    low, high = ax.get_ylim()
    assert low == -high  # a rise and a fall of the same size are drawn the same size
    assert "17 → 10" in ax.get_title() and "+17 in all" in ax.get_title()
    assert "images" in ax.get_ylabel()


def test_svd_plot_draws_the_noise_band_and_says_the_zig_zag_inside_it_is_noise(tmp_path: Path, drawn) -> None:
    plots.plot_svd_sweep(_sweep([0.9866, 0.9862, 0.9867, 0.9863]), tmp_path / "svd.png", n_test=N_TEST)
    plots.plot_svd_sweep(_sweep([0.9866, 0.9862, 0.9867, 0.9900]), tmp_path / "svd2.png", n_test=N_TEST)
    half = plots.binomial_halfwidth(0.9868, N_TEST)
    for fig in drawn:
        ax = fig.axes[0]
        (band,) = _bands(ax)
        ys = band.get_paths()[0].vertices[:, 1]
        assert min(ys) == pytest.approx(0.9868 - half) and max(ys) == pytest.approx(0.9868 + half)
        low, high = ax.get_ylim()
        assert low < 0.9868 - half and 0.9868 + half < high < 0.9868 + 3 * half  # the band shows, and not much more
        assert _legend_is_outside(fig, ax)
    assert "all within the test set's noise" in drawn[0].axes[0].get_title()
    assert "1 of 5 outside the test set's noise" in drawn[1].axes[0].get_title()  # r=8 at +32 images; the full fine-tune counts


def test_merge_plot_draws_the_noise_band_and_keeps_its_legend_off_the_data(tmp_path: Path, drawn) -> None:
    plots.plot_merge_study(_merge_result([0.9866, 0.9871, 0.9868]), tmp_path / "merge.png")
    (fig,) = drawn
    ax = fig.axes[0]
    (band,) = _bands(ax)
    ys = band.get_paths()[0].vertices[:, 1]
    half = plots.binomial_halfwidth(0.9868, N_TEST)
    assert min(ys) == pytest.approx(0.9868 - half) and max(ys) == pytest.approx(0.9868 + half)
    assert _legend_is_outside(fig, ax)
    assert {t.get_text() for t in ax.get_legend().get_texts()} >= {"ties", "task_arithmetic", "base"}
    assert "all within the test set's noise" in ax.get_title()
    assert ax.get_ylabel() == "test accuracy" and ax.get_yaxis().get_major_formatter().get_useOffset() is False
