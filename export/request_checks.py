"""What `llava-export` checks before any slow import: the options, the destination and the calibration images, so a
mistake there costs a second rather than torch's start."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..runtime.errors import ExportError
from .options import DECODER_OPSETS, check_precisions
from .staging import check_destination


def calibration_sources(directory: str | Path | None) -> Path | None:
    """The calibration image directory (None: the built-in set), checked to hold image files."""
    from .calibration import image_files

    if directory is not None:
        image_files(Path(directory))
    return None if directory is None else Path(directory)


def check_export_options(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    precisions: Sequence[str],
    calibration_images: str | Path | None,
    force: bool,
    decoder_opset: int,
) -> tuple[tuple[str, ...], Path | None]:
    """The precisions and the calibration directory of an export request, or `ExportError` for the first option,
    destination or calibration directory that is wrong; nothing here imports torch or transformers (the checkpoint
    itself is read by `read_checkpoint`, which does)."""
    precisions = check_precisions(precisions)
    if decoder_opset not in DECODER_OPSETS:
        raise ExportError(f"--decoder-opset is {' or '.join(map(str, DECODER_OPSETS))}, not {decoder_opset}")
    if calibration_images is not None and "int8" not in precisions:
        raise ExportError("--calibration-images is used by --precision int8 only")
    check_destination(Path(out_dir), force, keep=Path(checkpoint_dir))
    return precisions, calibration_sources(calibration_images) if "int8" in precisions else None
