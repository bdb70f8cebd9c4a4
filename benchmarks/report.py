"""Benchmark results as Markdown tables (stage times, drift from fp32), a JSON document and a PNG chart (matplotlib)
of the llava-rt / transformers ratios."""

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
    ("peak_device_mb", "device memory held after the run", "MiB", False),
    ("roofline_fraction", "decode roofline fraction", "", True),
)
REFERENCE = "transformers"
TENSORRT_NOTE = (
    "The standard (TensorRT) form of the int8 vision graphs is judged by its fake-quant accuracy in the drift table, "
    "not by its CPU speed here: onnxruntime's fused CPU int8 kernels saturate on CPUs without VNNI."
)
CUDA_NOTE = (
    "On cuda: transformers runs fp16 with SDPA attention under torch.inference_mode (its time is taken with the device "
    "synchronized); llava-rt runs onnxruntime's CUDA provider. Device memory is what each side's own process holds on "
    "the GPU after its run, as nvidia-smi reports it (the CUDA context included)."
)
DRIFT_NOTES = (
    "Drift from fp32, recorded at export. Per graph: the variant run and the mean cosine of its outputs with the fp32 "
    "graph's (onnxruntime: the variant run by onnxruntime; fake-quant: its Q/DQ arithmetic as TensorRT computes it). "
    "Decoder top-1: last-token argmax agreement over the export's prompts. Pipeline: the share of greedy tokens before "
    "the first difference from fp32 (the export measures the default form only).",
    "Random weights (every preset) make drift look worse than trained weights do: a random network's outputs are "
    "accumulated noise, and rounding noise moves them further than it moves a trained network's.",
)


def summarize(values: list[float]) -> dict[str, Any]:
    """Median and spread (min, max) of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def ratios(sides: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each llava-rt side's median over transformers' median, per metric both sides have."""
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


def _graph_cell(entry: dict[str, Any]) -> str:
    if "cosine" not in entry:
        return f"{entry['variant']} (reference)"
    return f"{entry['variant']} {entry['cosine']:.5f}" + (f" ({entry['run']})" if "run" in entry else "")


def _pipeline_cell(pipeline: dict[str, Any] | None) -> str:
    if pipeline is None:
        return "not measured"
    return f"{pipeline['token_agreement']:.0%} of {pipeline['new_tokens']} tokens x {pipeline['prompts']} prompts"


def drift_table(drift: dict[str, dict[str, Any]]) -> str:
    """A Markdown table: one row per quantized side; per graph its variant and drift cosine, the decoder's top-1
    agreement and the pipeline's token agreement."""
    graphs = list(dict.fromkeys(graph for side in drift.values() for graph in side["graphs"]))
    lines = [
        "| drift from fp32 | "
        + " | ".join(f"{graph}: variant, cosine" for graph in graphs)
        + " | decoder top-1 | pipeline tokens |",
        "|---|" + "---|" * (len(graphs) + 2),
    ]
    for name, side in drift.items():
        decoder = side["graphs"].get("decoder", {})
        top1 = f"{decoder['top1_agreement']:.0%} of {decoder['prompts']} prompts" if "top1_agreement" in decoder else "-"
        cells = [_graph_cell(side["graphs"][graph]) if graph in side["graphs"] else "-" for graph in graphs]
        lines.append(f"| {name} | " + " | ".join([*cells, top1, _pipeline_cell(side["pipeline"])]) + " |")
    return "\n".join(lines)


def _runs_standard_int8_vision(drift: dict[str, dict[str, Any]]) -> bool:
    """Whether a side runs a vision-side graph's int8 variant in the standard (Q/DQ, TensorRT) form."""
    return any(
        graph != "decoder" and entry["variant"] == "int8" for side in drift.values() for graph, entry in side["graphs"].items()
    )


def report(result: dict[str, Any]) -> str:
    """What `llava-bench` prints: the stage table, then the drift table with what its figures mean."""
    drift = result["drift"]
    parts = [table(result)]
    if result["config"].get("device") == "cuda":
        parts.append(CUDA_NOTE)
    if _runs_standard_int8_vision(drift):
        parts.append(TENSORRT_NOTE)
    if drift:
        parts += [drift_table(drift), *DRIFT_NOTES]
    return "\n\n".join(parts)


def _median(entry: dict[str, Any]) -> str:
    median = entry["median"]
    return f"{median:.{3 if median < 1 else 1}f}"


def figure(result: dict[str, Any]):
    """A matplotlib figure: per metric, one horizontal bar per llava-rt side with its ratio to transformers (log axis,
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
    ax.set_xlabel(f"llava-rt / {REFERENCE} (ratio of medians, log scale; dashed line: same as {REFERENCE})")
    ax.set_ylabel("stage")
    config = result["config"]
    ax.set_title(
        f"llava-bench: {config['label']}\n{config['input_tokens']} input tokens, {config['new_tokens']} new tokens, "
        f"{config['threads']} threads, {config.get('device', 'cpu')}, median of {config['repeats']}",
        fontsize=10,
    )
    ax.legend(loc="best", fontsize=8)
    return fig


def chart(result: dict[str, Any], path: Path) -> None:
    """Save `figure(result)` as a PNG."""
    figure(result).savefig(path, format="png", dpi=120)
