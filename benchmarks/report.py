"""Benchmark results as a table, a JSON document and a PNG chart (matplotlib) of the bundle / transformers ratios."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

# (key, label, unit, higher is better); the roofline fraction is absolute, so it gets no ratio
METRICS = (
    ("preprocess_ms", "preprocessing", "ms", False),
    ("vision_ms", "vision (tower + projector)", "ms", False),
    ("ttft_ms", "time to first token", "ms", False),
    ("decode_tokens_per_s", "decode", "tok/s", True),
    ("peak_rss_mb", "peak resident memory", "MiB", False),
    ("roofline_fraction", "decode roofline fraction", "", True),
)
REFERENCE = "transformers"


def summarize(values: list[float]) -> dict[str, Any]:
    """Median and spread (min, max) of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def ratios(sides: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each bundle side's median over transformers' median, per metric both sides have."""
    reference = sides[REFERENCE]
    out = {}
    for name, side in sides.items():
        if name == REFERENCE:
            continue
        out[name] = {
            key: side[key]["median"] / reference[key]["median"]
            for key, *_ in METRICS
            if key != "roofline_fraction" and key in side and key in reference and reference[key]["median"] > 0
        }
    return out


def _cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "-"
    median, low, high = entry["median"], entry["min"], entry["max"]
    digits = 3 if median < 1 else 1
    spread = f" ±{(high - low) / 2:.{digits}f}" if high > low else ""
    return f"{median:.{digits}f}{spread}"


def table(result: dict[str, Any]) -> str:
    """A Markdown table: one row per metric, one column per side (median ± half the min-max spread), ratios in brackets."""
    sides, side_ratios = result["sides"], result["ratios"]
    names = list(sides)
    lines = ["| stage | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key, label, unit, higher in METRICS:
        if not any(key in sides[name] for name in names):
            continue
        cells = []
        for name in names:
            cell = _cell(sides[name].get(key))
            if name in side_ratios and key in side_ratios[name]:
                cell += f" ({side_ratios[name][key]:.2f}x)"
            cells.append(cell)
        direction = "higher" if higher else "lower"
        lines.append(f"| {label}{f' ({unit})' if unit else ''}, {direction} is better | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _median(entry: dict[str, Any]) -> str:
    median = entry["median"]
    return f"{median:.{3 if median < 1 else 1}f}"


def figure(result: dict[str, Any]):
    """A matplotlib figure: per metric, one horizontal bar per bundle side with its ratio to transformers (log axis,
    1.0 marked), each bar annotated with the ratio and both medians in their units."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    sides, side_ratios = result["sides"], result["ratios"]
    names = list(side_ratios)
    metrics = [m for m in METRICS if any(m[0] in side_ratios[n] for n in names)]
    height = 1 / (len(names) + 1)
    fig = Figure(figsize=(10, 1.0 + 0.45 * len(metrics) * len(names) + 0.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    values = [v for r in side_ratios.values() for v in r.values()]
    for index, name in enumerate(names):
        rows = [(row, key, unit) for row, (key, _, unit, _) in enumerate(metrics) if key in side_ratios[name]]
        y = [row + (index - (len(names) - 1) / 2) * height for row, _, _ in rows]
        widths = [side_ratios[name][key] - 1.0 for _, key, _ in rows]  # bars grow from parity, left or right
        bars = ax.barh(y, widths, left=1.0, height=height * 0.9, label=name)
        notes = [
            f"{side_ratios[name][key]:.2f}x ({_median(sides[name][key])} vs {_median(sides[REFERENCE][key])} {unit})"
            for _, key, unit in rows
        ]
        ax.bar_label(bars, notes, padding=4, fontsize=8)
    ax.axvline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    low, high = min(values + [1.0]) / 12, max(values + [1.0]) * 12  # room on both sides for the annotations
    ax.set_xlim(low, high)
    ax.set_xticks([t for t in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100) if low <= t <= high])
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set_yticks(
        range(len(metrics)),
        [
            f"{label}{f' ({unit})' if unit else ''}\n{'higher' if higher else 'lower'} is better"
            for _, label, unit, higher in metrics
        ],
    )
    ax.invert_yaxis()
    ax.set_xlabel(f"bundle / {REFERENCE} (ratio of medians, log scale; dashed line: same as {REFERENCE})")
    ax.set_ylabel("stage")
    config = result["config"]
    ax.set_title(
        f"llava-bench: {config['label']}\n{config['input_tokens']} input tokens, {config['new_tokens']} new tokens, "
        f"{config['threads']} threads, median of {config['repeats']}",
        fontsize=10,
    )
    ax.legend(loc="best", fontsize=8)
    return fig


def chart(result: dict[str, Any], path: Path) -> None:
    """Save `figure(result)` as a PNG."""
    figure(result).savefig(path, format="png", dpi=120)
