"""torch module -> ONNX file with named dynamic axes, standard `ai.onnx` operators only."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import onnx_ir as ir
import torch

from ..runtime.errors import ExportError
from .options import PORTABLE_OPSET

OPSET = PORTABLE_OPSET
# Graphs whose weights exceed this are saved with an external data file next to them.
EXTERNAL_DATA_THRESHOLD = 1 << 30


def _dynamic_shapes(args, flat_names: list[str], axes: dict[str, dict[int, str]]):
    """Mirror the (possibly nested) args structure with `Dim.AUTO` on every named axis."""
    names = iter(flat_names)

    def build(arg):
        if isinstance(arg, (tuple, list)):
            return tuple(build(a) for a in arg)
        return {axis: torch.export.Dim.AUTO for axis in axes.get(next(names), {})}

    return tuple(build(a) for a in args)


def _name_axes(model: ir.Model, axes: dict[str, dict[int, str]]) -> None:
    """Replace the exporter's symbolic dims (`s43`) on graph inputs and outputs by our axis names."""
    for value in [*model.graph.inputs, *model.graph.outputs]:
        names = axes.get(value.name, {})
        if names:
            value.shape = ir.Shape([names.get(axis, dim) for axis, dim in enumerate(value.shape)])


def _quiet_exporter_logs() -> None:
    """The exporter logs a warning per missing torchvision op; they are irrelevant here."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)


def export_onnx(
    module: torch.nn.Module,
    args: tuple,
    path: Path,
    input_names: list[str],
    output_names: list[str],
    axes: dict[str, dict[int, str]],
    external_data: bool = False,
    opset: int = OPSET,
    rewrite: Callable[[ir.Model], object] | None = None,
) -> None:
    """Export `module(*args)` to `path` (weights in `<path>.data` when large) at ai.onnx `opset`.

    `axes` names the dynamic axes of inputs and outputs: `{tensor name: {axis: axis name}}`.
    `external_data` forces the weights into `<path>.data` whatever their size.
    `rewrite` edits the exported model in place before it is saved (the decoder's fusions).
    """
    _quiet_exporter_logs()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module,
                args,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=_dynamic_shapes(args, input_names, axes),
                opset_version=opset,
                dynamo=True,
                verbose=False,
            )
        except Exception as exc:  # the exporter raises many error types, with long reports
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            summary = next((line for line in lines if line.startswith("<class")), lines[0] if lines else repr(exc))
            raise ExportError(f"ONNX export of {path.name} failed: {summary}") from exc
    _name_axes(program.model, axes)
    if rewrite is not None:
        rewrite(program.model)
    weight_bytes = sum(value.const_value.nbytes for value in program.model.graph.initializers.values())
    program.save(path, external_data=external_data or weight_bytes > EXTERNAL_DATA_THRESHOLD)
