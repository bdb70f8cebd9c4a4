"""checkpoint directory -> bundle directory, written atomically (temp dir, verify, rename)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from ..runtime.bundle import MANIFEST_NAME, read_array
from ..runtime.console import progress
from ..runtime.errors import BundleError, ExportError
from ..runtime.manifest_schema import REEXPORT_ADVICE, check_manifest
from . import verify
from .checkpoint import load_model, read_checkpoint
from .compat import check_transformers
from .fusion import decoder_export_options
from .graphs import (
    PROJECTOR_IO,
    VIDEO_POOL_IO,
    VISION_IO,
    DecoderWithCache,
    Projector,
    VideoPooler,
    VisionFeatures,
    decoder_example,
    decoder_io,
    kv_cache_spec,
)
from .manifest import build_manifest, config_sections, feature_layers, variant_entry
from .onnx_export import export_onnx
from .options import FUSED_OPSET
from .request_checks import check_export_options
from .staging import staged_directory
from .variants import add_variants, check_tensorrt, file_table, variant_stages


class _Stages:
    """The export's stages, announced as `[k/n] ...` through `log` and counted on a progress bar on a terminal."""

    def __init__(self, names: list[str], log: Callable[[str], None]):
        self._names, self._log, self._done = names, log, 0
        self._bar = progress(total=len(names), desc="export", unit="stage")

    def next(self) -> None:
        """Finish the current stage (if any) and announce the next one."""
        if self._done:
            self._bar.update()
        self._done += 1
        self._log(f"[{self._done}/{len(self._names)}] {self._names[self._done - 1]}")

    def close(self) -> None:
        self._bar.close()


def ties_embeddings(model) -> bool:
    """Whether lm_head shares its weight with the token embedding table."""
    return model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def _tied_table(graph_path: Path, embed: np.ndarray) -> dict[str, Any]:
    """Where the decoder's external data holds lm_head, so the runtime reads embeddings from that one copy."""
    vocab, hidden = embed.shape
    model = onnx.load(graph_path, load_external_data=False)
    for tensor in model.graph.initializer:
        dims = list(tensor.dims)
        if dims not in ([hidden, vocab], [vocab, hidden]) or tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        spec = {
            "file": info["location"],
            "offset": int(info.get("offset", 0)),
            "shape": dims,
            "dtype": embed.dtype.name,
            "transposed": dims == [hidden, vocab],
        }
        if np.array_equal(read_array(graph_path.parent, spec), embed):
            return spec
    raise ExportError("tied embeddings: the lm_head weight was not found in the decoder graph's external data")


def _export_graphs(
    model, work: Path, tolerance: float, decoder_opset: int, stages: _Stages, log: Callable[[str], None]
) -> tuple[dict[str, Any], dict[str, float]]:
    """Export the fp32 vision, projector and decoder graphs into `work` (two stages), verifying each; returns their
    manifest entries and diffs. The decoder is exported at `decoder_opset`, fused (`fusion`)."""
    config = model.config
    vision_config, text_config = config.vision_config, config.text_config
    generator = torch.Generator().manual_seed(0)
    graphs: dict[str, Any] = {}
    diffs: dict[str, float] = {}

    def record(name: str, diff: float) -> None:
        graphs[name] = {"variants": {"fp32": variant_entry(work / f"{name}.onnx", "fp32")}}
        diffs[name] = diff
        log(f"  {name}: max abs diff vs PyTorch {diff:.2e} (limit {tolerance:.0e})")
        if not diff <= tolerance:
            raise ExportError(f"{name} graph differs from PyTorch by {diff:.3e} (> {tolerance:.0e}); export aborted")

    stages.next()
    vision = VisionFeatures(model.model.vision_tower, feature_layers(config), config.vision_feature_select_strategy)
    size = vision_config.image_size
    pixel_values = torch.randn(2, 3, size, size, generator=generator)
    export_onnx(vision, (pixel_values,), work / "vision.onnx", VISION_IO.inputs, VISION_IO.outputs, VISION_IO.axes)
    diff, features = verify.verify_graph(work / "vision.onnx", vision, pixel_values, "pixel_values")
    record("vision", diff)

    projector = Projector(model.model.multi_modal_projector)
    features = features.contiguous()
    export_onnx(projector, (features,), work / "projector.onnx", PROJECTOR_IO.inputs, PROJECTOR_IO.outputs, PROJECTOR_IO.axes)
    record("projector", verify.verify_graph(work / "projector.onnx", projector, features, "image_features")[0])

    resampler = getattr(model.model, "vision_resampler", None)
    if resampler is not None:
        pooler = VideoPooler(resampler)
        export_onnx(
            pooler, (features,), work / "video_pool.onnx", VIDEO_POOL_IO.inputs, VIDEO_POOL_IO.outputs, VIDEO_POOL_IO.axes
        )
        record("video_pool", verify.verify_graph(work / "video_pool.onnx", pooler, features, "image_features")[0])

    stages.next()
    decoder = DecoderWithCache(model.model.language_model, model.lm_head)
    kv_cache = kv_cache_spec(text_config)
    example = decoder_example(text_config.hidden_size, kv_cache, torch.float32, generator)
    io = decoder_io(kv_cache)
    options = decoder_export_options(decoder_opset, log)
    export_onnx(
        decoder, example, work / "decoder.onnx", io.inputs, io.outputs, io.axes, external_data=ties_embeddings(model), **options
    )
    record("decoder", verify.verify_decoder(work / "decoder.onnx", model, kv_cache, torch.float32))
    graphs["decoder"]["kv_cache"] = kv_cache
    return graphs, diffs


def _check_loadable(manifest: dict[str, Any]) -> None:
    """Refuse to write a manifest the runtime would refuse to load."""
    try:
        check_manifest(manifest)
    except BundleError as exc:
        problem = str(exc).removesuffix(f"; {REEXPORT_ADVICE}")  # that advice is for a bundle already written
        raise ExportError(f"the runtime would refuse this bundle: {problem}") from None


def export_bundle(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    precisions: Sequence[str] = (),
    calibration_images: str | Path | None = None,
    force: bool = False,
    tolerance: float | None = None,
    decoder_opset: int = FUSED_OPSET,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Export a checkpoint into a bundle at `out_dir`; returns the manifest. Nothing is left behind on failure.

    The checkpoint (with every manifest value its configs give), the options and `out_dir` are checked before any
    heavy work; `force` replaces an existing bundle or an empty directory, nothing else. The fp32 graphs must match
    PyTorch within `tolerance` (max abs difference, default `verify.TOLERANCE`); they stay in the bundle as the
    reference of every precision variant `precisions` adds (fp16, int8, int4; see `variants`), whose drift is
    measured and recorded. int8 calibrates on the images in `calibration_images` (default: a built-in set). The
    manifest is checked as the runtime checks it before it is written. The decoder graphs are fused at
    `decoder_opset` 23; at 18 (for TensorRT 10.3) only their projections are (`fusion`).
    """
    options = checkpoint_dir, out_dir, precisions, calibration_images, force, decoder_opset
    precisions, calibration = check_export_options(*options)
    check_transformers()
    checkpoint = read_checkpoint(checkpoint_dir)
    tolerance = verify.TOLERANCE["fp32"] if tolerance is None else tolerance
    out_dir = Path(out_dir)
    sections = config_sections(checkpoint)
    started = time.perf_counter()
    names = [
        f"loading {checkpoint.model_class} from {checkpoint.path}",
        "exporting the vision graphs",
        "exporting the decoder graph (KV cache)",
        "writing embeddings, tokenizer and chat template",
        *variant_stages(precisions),
        "writing checksums and manifest",
    ]
    stages = _Stages(names, log)
    try:
        with staged_directory(out_dir) as work:
            stages.next()
            model = load_model(checkpoint, torch.float32)
            graphs, diffs = _export_graphs(model, work, tolerance, decoder_opset, stages, log)
            stages.next()
            embed = model.get_input_embeddings().weight.detach().float().numpy()
            arrays = {"image_newline": "image_newline.npy", "embed_tokens": "embed_tokens.npy"}
            if ties_embeddings(model):
                arrays["embed_tokens"] = _tied_table(work / "decoder.onnx", embed)
            else:
                np.save(work / "embed_tokens.npy", embed)
            np.save(work / "image_newline.npy", model.model.image_newline.detach().float().numpy())
            shutil.copyfile(checkpoint.tokenizer_file, work / "tokenizer.json")
            if checkpoint.chat_template is not None:
                (work / "chat_template.jinja").write_text(checkpoint.chat_template, encoding="utf-8")
            manifest = build_manifest(checkpoint, sections, model, graphs, arrays, diffs, tolerance)
            if precisions:
                add_variants(model, work, manifest, precisions, calibration, stages.next, log)
            del model
            stages.next()
            check_tensorrt(work, manifest, log)
            stages.next()
            manifest["files"] = file_table(work)
            _check_loadable(manifest)
            (work / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    finally:
        stages.close()
    log(f"wrote {out_dir} in {time.perf_counter() - started:.1f}s")
    return manifest
