"""What the demo writes from its stages' results: ``report.md`` (one section per stage) and the PNG plots."""

from __future__ import annotations

from pathlib import Path

from mnist_peft.io.adapters import ADAPTER_WEIGHTS_NAME

__all__ = ["SEED_FACTS", "demo_report", "demo_plots"]

# What the seed notebook printed (../shared/seed/FACTS.md).
SEED_FACTS = {
    "base_accuracy": 0.953,
    "base_wrong": [33, 28, 42, 95, 19, 10, 61, 52, 19, 107],
    "lora_accuracy": 0.843,
    "lora_wrong": [53, 32, 60, 201, 186, 85, 69, 677, 193, 11],
    "lora_parameters": 6794,
    "total_parameters": 2813804,
}


def demo_plots(out: Path, results: dict, folders: list[Path]) -> list[str]:
    """Draw every plot into ``out``; their paths, the merge study's last."""
    from .plots import plot_merge_study

    files = _plots(out, results["base"], results["seed"], results["replay"], results["svd"], folders)
    files.append(str(plot_merge_study(results["merge"], out / "merge-vs-density.png")))
    return files


def demo_report(results: dict, folders: list[Path]) -> str:
    """``report.md``: one section per stage, the merge study's last."""
    from .merge_study import grid_note, study_table

    r = results
    note = grid_note(r["merge"])
    report = _report(r["base"], r["seed"], r["replay"], r["headroom"], r["combine"], r["exact"], r["parity"], r["svd"], folders)
    return report + "\n".join(
        [
            "## 8. One adapter for all ten digits",
            "",
            *([note, ""] if note else []),
            *study_table(r["merge"]),
            "",
            "Test accuracy vs density per method (each density at the scale validation chose for it):",
            "",
            "![Test accuracy vs density](merge-vs-density.png)",
            "",
            _noise_caption("merge-vs-density.png", "merges", r["merge"]["base"]["test"]),
            "",
        ]
    )


def _plots(out: Path, base_info: dict, seed: dict, replay: dict, svd: dict, folders: list[Path]) -> list[str]:
    from .plots import plot_change_heatmap, plot_error_change, plot_error_rates, plot_svd_sweep

    base_wrong = base_info["eval"]["wrong_per_digit"]
    paths = [
        plot_error_rates(
            {"seed-recipe base": seed["before"]["error_rate_per_digit"]},
            out / "error-rates-before.png",
            title="Error rate per digit, before LoRA (seed recipe)",
        ),
        plot_error_rates(
            {"base": seed["before"]["error_rate_per_digit"], "digit-9 LoRA (seed recipe)": seed["lora_on"]["error_rate_per_digit"]},
            out / "error-rates-seed-lora.png",
            title="With the seed's digit-9 LoRA: 9 fixed, the others forgotten",
        ),
        plot_error_change(
            base_wrong,
            replay["rows"][9]["eval"]["wrong_per_digit"],
            out / "error-rates-replay-lora.png",
            digit=9,
            label="Our digit-9 LoRA (replay recipe)",
        ),
        plot_change_heatmap(
            [r["eval"]["wrong_per_digit"] for r in replay["rows"]],
            base_wrong,
            out / "adapter-digit-heatmap.png",
            row_labels=[f"digit-{r['digit']}" for r in replay["rows"]],
            col_labels=[str(d) for d in range(10)],
            title="Each replay adapter (rows) against the base:\nchange in test images wrong per digit (columns)",
        ),
        plot_svd_sweep(svd, out / "svd-accuracy-vs-rank.png", n_test=base_info["eval"]["n"]),
    ]
    paths.append(_savings_plot(out, base_info, seed, folders))
    return [str(p) for p in paths]


def _savings_plot(out: Path, base_info: dict, seed: dict, folders: list[Path]) -> Path:
    """Parameters and file bytes, one panel each: the base, the seed's r=1 LoRA, a replay adapter."""
    from mnist_peft.io.adapters import read_adapter

    from .plots import plot_savings

    adapter = read_adapter(folders[9])
    r = adapter.config.r
    panels = {
        "parameters": {
            "base": seed["base_parameters"],
            "seed LoRA\nr=1": seed["lora_parameters"],
            f"replay LoRA\nr={r}": sum(t.numel() for t in adapter.state_dict.values()),
        },
        "file size (bytes)": {
            "base\nmodel.safetensors": (Path(base_info["path"]) / "model.safetensors").stat().st_size,
            f"replay LoRA r={r}\n{ADAPTER_WEIGHTS_NAME}": (folders[9] / ADAPTER_WEIGHTS_NAME).stat().st_size,
        },
    }
    return plot_savings(panels, out / "savings.png", title="What an adapter costs next to its base")


def _noise_caption(png: str, what: str, base_eval: dict) -> str:
    """What the grey band of ``png`` is: the base's 95% binomial interval on the test set."""
    from .plots import binomial_halfwidth

    n = base_eval["n"]
    images = binomial_halfwidth(base_eval["accuracy"], n) * n
    return (
        f"In `{png}` the grey band is the base's 95% binomial interval on the {n:,} test images "
        f"(±{images:.0f} images): differences between the {what} that stay inside it are the test set's noise."
    )


def _fmt(values: list) -> str:
    return " ".join(str(v) for v in values)


def _report(
    base_info: dict,
    seed: dict,
    replay: dict,
    headroom: list[dict],
    combined: dict,
    exact: dict,
    parity: dict,
    svd: dict,
    folders: list[Path],
) -> str:
    """``report.md``: one section per stage."""
    lines = ["# mnist-peft demo report", ""]
    lines += _report_seed(seed)
    lines += _report_replay(base_info, replay, headroom)
    lines += _report_combine(combined)
    lines += _report_exact_and_parity(exact, parity)
    lines += _report_svd_and_savings(svd, base_info, folders)
    return "\n".join(lines)


def _report_seed(seed: dict) -> list[str]:
    f = SEED_FACTS
    return [
        "## 1. The seed's experiment, reproduced",
        "",
        "| | accuracy | wrong per digit 0..9 |",
        "|---|---|---|",
        f"| seed notebook, base (printed) | {f['base_accuracy']} | {_fmt(f['base_wrong'])} |",
        f"| ours, seed-recipe base | {seed['before']['accuracy']:.4f} | {_fmt(seed['before']['wrong_per_digit'])} |",
        f"| seed notebook, digit-9 LoRA on (printed) | {f['lora_accuracy']} | {_fmt(f['lora_wrong'])} |",
        f"| ours, digit-9 LoRA on (seed recipe) | {seed['lora_on']['accuracy']:.4f} | {_fmt(seed['lora_on']['wrong_per_digit'])} |",
        f"| ours, LoRA off | {seed['lora_off']['accuracy']:.4f} | {_fmt(seed['lora_off']['wrong_per_digit'])} |",
        "",
        f"LoRA off equals before exactly: **{seed['lora_off_equals_before']}**. LoRA parameters {seed['lora_parameters']:,} "
        f"(seed: {f['lora_parameters']:,}); total {seed['total_parameters']:,} (seed: {f['total_parameters']:,}); "
        f"+{100 * seed['lora_parameters'] / seed['base_parameters']:.3f}% (seed: 0.242%).",
        "",
    ]


def _target_verdict(w0: int, w1: int, accuracy: float, base_accuracy: float) -> tuple[bool, str]:
    """Whether an adapter meets both targets (>= 40% fewer digit errors, accuracy not lower), and why not."""
    ok = w1 <= 0.6 * w0 and accuracy >= base_accuracy
    why = (
        "yes"
        if ok
        else ("no: fewer than 40% fixed" if w1 > 0.6 * w0 else "no: accuracy dropped")
        + ("" if not (w1 > 0.6 * w0 and accuracy < base_accuracy) else " and accuracy dropped")
    )
    return ok, why


def _report_replay(base_info: dict, replay: dict, headroom: list[dict]) -> list[str]:
    b = base_info["eval"]
    lines = [
        "## 2. Our answer: replay adapters on the default base",
        "",
        f"Base ({base_info['source']}): accuracy {b['accuracy']:.4f}; wrong per digit {_fmt(b['wrong_per_digit'])}.",
        "",
        "| adapter | digit wrong before | after | change | accuracy before | after | target met (>= 40% fewer, accuracy not lower) | best logit offset alone: digit wrong, total wrong |",
        "|---|---|---|---|---|---|---|---|",
    ]
    met = 0
    for r in replay["rows"]:
        d, e = r["digit"], r["eval"]
        w0, w1 = b["wrong_per_digit"][d], e["wrong_per_digit"][d]
        change = f"{100 * (w1 - w0) / w0:+.0f}%" if w0 else "n/a"
        ok, why = _target_verdict(w0, w1, e["accuracy"], b["accuracy"])
        met += ok
        h = headroom[d]
        ref = f"{h['wrong_after']}, {h['total_wrong_before']} -> {h['total_wrong_after']}"
        lines.append(f"| digit-{d} | {w0} | {w1} | {change} | {b['accuracy']:.4f} | {e['accuracy']:.4f} | {why} | {ref} |")
    lines += [
        "",
        f"{met}/10 adapters meet both targets. The last column is the reference for the trade (`mnist-peft headroom`): "
        "the constant added to the digit's logit that cuts its errors by >= 40% with the fewest overall errors, "
        f"chosen on the test set itself. It keeps overall accuracy for {sum(h['both_met'] for h in headroom)}/10 digits.",
        "",
        "`adapter-digit-heatmap.png` draws the table below as each adapter's change against the base, in test images "
        "wrong (blue: fewer errors, red: more); `error-rates-replay-lora.png` draws the digit-9 adapter's row as bars.",
        "",
        "### Error rate per test digit (columns) for each adapter (rows)",
        "",
        "| adapter | " + " | ".join(str(d) for d in range(10)) + " |",
        "|---" * 11 + "|",
    ]
    lines.append("| base | " + " | ".join(f"{v:.4f}" for v in b["error_rate_per_digit"]) + " |")
    for r in replay["rows"]:
        lines.append(f"| digit-{r['digit']} | " + " | ".join(f"{v:.4f}" for v in r["eval"]["error_rate_per_digit"]) + " |")
    return lines


def _report_combine(st: dict) -> list[str]:
    return [
        "",
        "## 3. Stacking and combining",
        "",
        "| model | accuracy | wrong per digit 0..9 |",
        "|---|---|---|",
        f"| stack of digits {st['stack_digits']} (unmerged) | {st['stack_unmerged']['accuracy']:.4f} | {_fmt(st['stack_unmerged']['wrong_per_digit'])} |",
        f"| same stack, merged | {st['stack_merged']['accuracy']:.4f} | {_fmt(st['stack_merged']['wrong_per_digit'])} |",
        f"| all ten by `cat` (r={st['cat']['r']}) | {st['cat']['eval']['accuracy']:.4f} | {_fmt(st['cat']['eval']['wrong_per_digit'])} |",
        f"| all ten by `svd` (r={st['svd']['r']}) | {st['svd']['eval']['accuracy']:.4f} | {_fmt(st['svd']['eval']['wrong_per_digit'])} |",
        "",
        f"`svd` relative Frobenius error per layer: {', '.join(f'{k} {v:.3f}' for k, v in st['svd']['relative_error'].items())}.",
        "",
    ]


def _report_exact_and_parity(exact: dict, parity: dict) -> list[str]:
    lines = [
        "## 4. Exactness",
        "",
        f"- the adapter changes the output: {exact['adapter_changes_output']}",
        f"- LoRA off gives the base's outputs bit for bit: {exact['lora_off_equals_base']}",
        f"- 100 merge/unmerge cycles give the base weights back bit for bit: {exact['unmerge_100_cycles_bit_exact']}",
        "",
        "## 5. Native LoRA vs peft",
        "",
        f"{parity['passed']}/{parity['total']} parity cases pass.",
        "",
        "| case | forward max diff | grad max diff | train max diff | merged ulps | unmerge exact | peft unmerge drift |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in parity["cases"]:
        lines.append(
            f"| {c['case']} | {c['forward_max_diff']:.1e} | {c['grad_max_diff']:.1e} | {c['train_max_diff']:.1e} | {c['merged_max_ulps']:.0f} | {c['unmerge_exact']} | {c['peft_unmerge_drift']:.1e} |"
        )
    return lines


def _report_svd_and_savings(svd: dict, base_info: dict, folders: list[Path]) -> list[str]:
    lines = [
        "",
        "## 6. LoRA by SVD of a full fine-tune (digit 9)",
        "",
        "| model | parameters | accuracy | digit-9 wrong |",
        "|---|---|---|---|",
        f"| base | - | {svd['base']['accuracy']:.4f} | {svd['base']['wrong_per_digit'][9]} |",
        f"| full fine-tune | {svd['full']['parameters']:,} | {svd['full']['accuracy']:.4f} | {svd['full']['wrong_per_digit'][9]} |",
    ]
    for r in svd["rows"]:
        lines.append(f"| LoRA r={r['r']} | {r['parameters']:,} | {r['accuracy']:.4f} | {r['wrong_per_digit'][9]} |")
    lines += ["", _noise_caption("svd-accuracy-vs-rank.png", "ranks", base_info["eval"])]
    adapter_bytes = (folders[9] / ADAPTER_WEIGHTS_NAME).stat().st_size
    base_bytes = (Path(base_info["path"]) / "model.safetensors").stat().st_size
    lines += [
        "",
        "## 7. Savings",
        "",
        f"A replay adapter file is {adapter_bytes:,} bytes against the base's {base_bytes:,} ({100 * adapter_bytes / base_bytes:.2f}%).",
        "",
        "Plots: `error-rates-before.png`, `error-rates-seed-lora.png`, `error-rates-replay-lora.png`, "
        "`adapter-digit-heatmap.png`, `svd-accuracy-vs-rank.png`, `savings.png`.",
        "",
    ]
    return lines
