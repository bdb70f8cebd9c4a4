"""Precision variants of a bundle's fp32 graphs, their drift from fp32, and the static TensorRT check.

fp16: every graph, exported from PyTorch with fp32 islands (`fp16`). int8: the vision tower and projector as
Q/DQ graphs calibrated on images, in TensorRT's form and onnxruntime's (`static_int8`), and the decoder
weight-only plus an int8-activation onnxruntime form (`weight_only`). int4: the decoder, weight-only. Each variant
is listed in the manifest beside its fp32 reference, with its drift.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..runtime.bundle import Bundle, read_array, sha256_file
from ..runtime.manifest_schema import graph_variants
from ..runtime.pipeline import Pipeline
from .drift import decoder_drift, graph_drift
from .fusion import graph_opset
from .manifest import variant_entry
from .options import PORTABLE_OPSET

if TYPE_CHECKING:
    from .static_int8 import TileInputs

DRIFT_TILES = 8  # tiles (of the calibration or built-in images) each vision-side variant is compared on
DRIFT_NEW_TOKENS = 32
DRIFT_PROMPT = "Describe this image."
SHOWN_FINDINGS = 3  # TensorRT findings the export prints per version (the manifest records them all)


def variant_stages(precisions: Sequence[str]) -> list[str]:
    """The export stages `add_variants` and `check_tensorrt` announce, in order."""
    stages = []
    if "fp16" in precisions:
        stages.append("exporting fp16 graphs (fp32 islands: norms, softmax, rotary tables, mask)")
    if "int8" in precisions:
        stages.append("calibrating the vision tower and projector on images and writing int8 Q/DQ graphs")
    weight_only = [precision for precision in ("int8", "int4") if precision in precisions]
    if weight_only:
        stages.append(f"quantizing the decoder to {' and '.join(weight_only)} (onnxruntime copies with GroupQueryAttention)")
    if precisions:
        stages.append("measuring each variant's drift from fp32")
    stages.append("checking the standard-form graphs against TensorRT's ONNX parser")
    return stages


def file_table(work: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file of the bundle being written."""
    return {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(work.iterdir()) if p.is_file()}


def add_variants(
    model,
    work: Path,
    manifest: dict[str, Any],
    precisions: Sequence[str],
    calibration: Path | None,
    next_stage: Callable[[], None],
    log: Callable[[str], None],
) -> None:
    """Write the variants of `precisions` next to the fp32 graphs in `work`, list them in `manifest` with their drift.
    fp16 converts `model` to fp16 in place (no second copy of the weights); nothing after it needs the fp32 model."""
    written: dict[str, dict[str, Path]] = {}
    newline = np.load(work / "image_newline.npy")
    inputs = None
    if "fp16" in precisions:
        from .fp16 import export_fp16_graphs

        next_stage()
        for graph, path in export_fp16_graphs(model, work, list(manifest["graphs"]), log).items():
            written.setdefault(graph, {})["fp16"] = path
    if "int8" in precisions:
        from .calibration import calibration_tiles
        from .static_int8 import TileInputs, quantize_vision_graphs

        next_stage()
        inputs = TileInputs(work, calibration_tiles(manifest, newline, calibration, log))
        for graph, paths in quantize_vision_graphs(inputs, log).items():
            written.setdefault(graph, {}).update(paths)
    weight_only = [precision for precision in ("int8", "int4") if precision in precisions]
    if weight_only:
        from .group_query_attention import add_onnxruntime_copies
        from .weight_only import quantize_decoder

        next_stage()
        kv_cache, windows = manifest["graphs"]["decoder"]["kv_cache"], manifest["text"]["sliding_windows"]
        for precision in weight_only:
            quantized = quantize_decoder(work / "decoder.onnx", precision, log)
            written.setdefault("decoder", {}).update(add_onnxruntime_copies(quantized, kv_cache, windows, log))
    for graph, paths in written.items():
        for key, path in paths.items():
            manifest["graphs"][graph]["variants"][key] = variant_entry(path, key)
    if "int8" in precisions:  # see int8_activations: a token's result does not depend on the run's other tokens
        manifest["graphs"]["decoder"]["variants"]["int8.ort"]["activation_scales"] = "per_token"
    next_stage()
    if inputs is None:
        from .calibration import calibration_tiles
        from .static_int8 import TileInputs

        inputs = TileInputs(work, calibration_tiles(manifest, newline, None, lambda message: None))
    _record_graph_drift(work, manifest, inputs, log)
    _record_pipeline_drift(work, manifest, precisions, log)


def _record_graph_drift(work: Path, manifest: dict[str, Any], inputs: TileInputs, log: Callable[[str], None]) -> None:
    """Each variant's drift from its fp32 graph: vision-side graphs on the first `DRIFT_TILES` tiles of `inputs`
    (`static_int8.TileInputs`; Q/DQ standard forms in fake-quant, as TensorRT computes them), the decoder on fixed
    prompts (last-token logits)."""
    graphs = manifest["graphs"]
    embed = read_array(work, manifest["arrays"]["embed_tokens"])
    for graph, key, entry in graph_variants(manifest):
        if key == "fp32":
            continue
        reference, variant = work / graphs[graph]["variants"]["fp32"]["file"], work / entry["file"]
        if graph == "decoder":
            entry["drift"] = drift = decoder_drift(reference, variant, embed, graphs["decoder"]["kv_cache"])
            log(
                f"  decoder {key}: last-token logit cosine {drift['cosine']:.5f} (worst {drift['min_cosine']:.5f}), "
                f"top-1 agreement {drift['top1_agreement']:.0%} over {drift['prompts']} prompts"
            )
            continue
        fused = not (entry["precision"] == "int8" and entry["form"] == "standard")
        output = entry["outputs"][0]["name"]
        references = inputs.fp32_outputs(graph, DRIFT_TILES)
        entry["drift"] = drift = graph_drift(references, variant, inputs.feeds(graph, DRIFT_TILES), output, fused=fused)
        log(
            f"  {graph} {key}: cosine {drift['cosine']:.5f} (worst token {drift['min_cosine']:.5f}), "
            f"max abs diff {drift['max_abs_diff']:.2e} on {drift['samples']} tiles ({drift['run']})"
        )


def _drift_images() -> list[Any]:
    """Two fixed images for the end-to-end comparison: smooth colour fields of different aspect ratios."""
    from PIL import Image

    images = []
    for seed, (height, width) in enumerate(((240, 320), (300, 200))):
        rng = np.random.default_rng(seed)
        coarse = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
        images.append(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
    return images


def _record_pipeline_drift(work: Path, manifest: dict[str, Any], precisions: Sequence[str], log: Callable[[str], None]) -> None:
    """Greedy answers of the whole pipeline at each precision against fp32, on fixed image+text prompts: the share of
    new tokens before the first difference (after it, each continues from a different text)."""
    bundle = Bundle(path=work, manifest={**manifest, "files": file_table(work)})
    images = _drift_images()
    chat = manifest.get("chat_template") is not None
    prompt = DRIFT_PROMPT if chat else f"{manifest['tokens']['image_token']}\n{DRIFT_PROMPT}"

    def answers(precision: str) -> tuple[list[list[int]], dict[str, str]]:
        pipeline = Pipeline(bundle, precision=precision)
        results = [
            pipeline.generate(
                prompt=prompt, images=[image], apply_chat_template=chat, max_new_tokens=DRIFT_NEW_TOKENS, do_sample=False
            )
            for image in images
        ]
        return [result.token_ids for result in results], pipeline.selection.variants

    reference, _ = answers("fp32")
    drift = {}
    for precision in precisions:
        tokens, variants = answers(precision)
        shares = [_common_prefix(a, b) / max(len(a), len(b), 1) for a, b in zip(reference, tokens)]
        drift[precision] = {
            "token_agreement": float(np.mean(shares)),
            "prompts": len(images),
            "new_tokens": DRIFT_NEW_TOKENS,
            "variants": variants,
        }
        log(
            f"  pipeline {precision}: {drift[precision]['token_agreement']:.0%} of {DRIFT_NEW_TOKENS} greedy tokens "
            f"agree with fp32 before the first difference, over {len(images)} image prompts"
        )
    manifest["verification"]["pipeline_drift"] = drift


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def check_tensorrt(work: Path, manifest: dict[str, Any], log: Callable[[str], None]) -> None:
    """Run the static TensorRT parser check on every standard-form graph, for each TensorRT version it knows; record
    the findings (onnxruntime-only forms are not meant for TensorRT and are not checked)."""
    from ..engines.tensorrt_check import check_graphs
    from ..engines.tensorrt_support import TRT_VERSIONS, support_for

    standard = [entry["file"] for _, _, entry in graph_variants(manifest) if entry["form"] == "standard"]
    decoder_opset = graph_opset(work / "decoder.onnx")
    results = {}
    for version in TRT_VERSIONS:
        checked = check_graphs([work / name for name in standard], version)
        findings = [str(finding) for finding in checked]
        results[version] = {"passed": not findings, "graphs": len(standard), "findings": findings}
        verdict = f"{len(findings)} finding(s)" if findings else "pass"
        shown = findings[:SHOWN_FINDINGS]
        if findings and decoder_opset > support_for(version).opsets[1] and all(f.graph.startswith("decoder.") for f in checked):
            verdict += (
                f", all in the opset-{decoder_opset} decoder graphs (`llava-export --decoder-opset {PORTABLE_OPSET}` "
                f"writes them for TensorRT {version})"
            )
            shown = []
        log(f"  TensorRT {version} ONNX parser, {len(standard)} standard graphs: {verdict}")
        for finding in shown:
            log(f"    {finding}")
        if len(findings) > len(shown) and shown:
            log(f"    ... {len(findings) - len(shown)} more: llava-bundle check BUNDLE --tensorrt --trt-version {version}")
    manifest["verification"]["tensorrt"] = results
