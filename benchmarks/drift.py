"""How far each quantized llava-rt side's variants drift from fp32, as the bundle's export measured and recorded it."""

from __future__ import annotations

from typing import Any

from .sides import BundleChoice


def side_drift(manifest: dict[str, Any], choice: BundleChoice) -> dict[str, Any]:
    """Per graph, the variant `choice` runs and its recorded drift (none for an fp32 reference); the whole pipeline's
    greedy-token agreement with fp32 where the export measured these very variants (it measures the default form)."""
    variants = choice.selection(manifest).variants
    graphs = {
        graph: {"variant": key, **manifest["graphs"][graph]["variants"][key].get("drift", {})} for graph, key in variants.items()
    }
    pipeline = manifest["verification"].get("pipeline_drift", {}).get(choice.precision)
    measured = pipeline is not None and pipeline["variants"] == variants
    return {
        "precision": choice.precision,
        "form": choice.form,
        "graphs": graphs,
        "pipeline": {key: pipeline[key] for key in ("token_agreement", "prompts", "new_tokens")} if measured else None,
    }


def bundle_drift(manifest: dict[str, Any], choices: list[BundleChoice]) -> dict[str, dict[str, Any]]:
    """`side_drift` of every side but the fp32 ones (the reference), by side name."""
    return {choice.name: side_drift(manifest, choice) for choice in choices if choice.precision != "fp32"}
