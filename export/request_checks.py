"""What `llava-export` checks first: the options, the destination and the calibration images before any slow import
(a mistake there costs a second rather than torch's start), then the checkpoint's files and config."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..runtime.errors import ExportError
from .checkpoint import Checkpoint, read_checkpoint
from .compat import check_transformers
from .options import DECODER_OPSETS, check_precisions
from .staging import check_destination


def calibration_sources(directory: str | Path | None) -> Path | None:
    """The calibration image directory (None: the built-in set), checked to hold image files."""
    from .calibration import image_files

    if directory is not None:
        image_files(Path(directory))
    return None if directory is None else Path(directory)


def check_export_request(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    precisions: Sequence[str],
    calibration_images: str | Path | None,
    force: bool,
    decoder_opset: int,
) -> tuple[Checkpoint, tuple[str, ...], Path | None]:
    """The checkpoint, the precisions and the calibration directory of an export request, or `ExportError` /
    `CheckpointError` for the first thing wrong (the manifest values the configs give are checked by the exporter)."""
    precisions = check_precisions(precisions)
    if decoder_opset not in DECODER_OPSETS:
        raise ExportError(f"--decoder-opset is {' or '.join(map(str, DECODER_OPSETS))}, not {decoder_opset}")
    if calibration_images is not None and "int8" not in precisions:
        raise ExportError("--calibration-images is used by --precision int8 only")
    check_destination(Path(out_dir), force, keep=Path(checkpoint_dir))
    calibration = calibration_sources(calibration_images) if "int8" in precisions else None
    check_transformers()
    return read_checkpoint(checkpoint_dir), precisions, calibration  # reads config.json with transformers
