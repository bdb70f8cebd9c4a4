"""Benchmark results as a table, a JSON document and a PNG chart of the bundle / transformers ratios."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

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


def chart(result: dict[str, Any], path: Path) -> None:
    """Horizontal bars of each bundle side's ratio to transformers, per metric, with the 1.0 line marked."""
    side_ratios = result["ratios"]
    names = list(side_ratios)
    keys = [(key, label, higher) for key, label, _, higher in METRICS if any(key in side_ratios[n] for n in names)]
    colors = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
    font = ImageFont.load_default()
    bar, gap, left, width = 14, 18, 300, 420
    height = 60 + len(keys) * (len(names) * bar + gap) + 20 * len(names)
    largest = max([v for r in side_ratios.values() for v in r.values()] + [1.0]) * 1.1
    image = Image.new("RGB", (left + width + 80, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), f"llava-bench: bundle / transformers ({result['config']['label']})", fill="black", font=font)
    y = 40
    for key, label, higher in keys:
        draw.text((10, y), f"{label} ({'higher' if higher else 'lower'} is better)", fill="black", font=font)
        for index, name in enumerate(names):
            value = side_ratios[name].get(key)
            if value is not None:
                draw.rectangle([left, y, left + int(width * value / largest), y + bar - 3], fill=colors[index % len(colors)])
                draw.text((left + int(width * value / largest) + 4, y), f"{value:.2f}x", fill="black", font=font)
            y += bar
        y += gap
    one = left + int(width / largest)
    draw.line([one, 35, one, y - gap], fill="gray", width=1)
    for index, name in enumerate(names):
        draw.rectangle([10, y, 20, y + 10], fill=colors[index % len(colors)])
        draw.text((26, y), name, fill="black", font=font)
        y += 20
    image.save(path)
