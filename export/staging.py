"""Where a bundle (or a cached checkpoint) is written: checks before any heavy work, then a temporary sibling
directory renamed into place, so that a failure, Ctrl-C, SIGTERM or SIGHUP leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..runtime.bundle import MANIFEST_NAME
from ..runtime.errors import ExportError

COMPLETE_MARK = ".complete"  # written last into a directory `built_once` made


def is_bundle(path: Path) -> bool:
    """Whether `path` is a directory holding a llava-rt manifest (whatever its format version or state)."""
    try:
        manifest = json.loads((path / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "format_version" in manifest


def check_destination(out: Path, force: bool, keep: Path | None = None) -> None:
    """Refuse an output path that cannot take a bundle: a file, a symbolic link, a path under a file, an existing
    directory without `force`, or (even with `force`) one that is neither a bundle nor empty, or holds `keep`."""
    if out.is_symlink():
        raise ExportError(f"--out is a symbolic link: {out} (give the path of a real directory)")
    if out.exists():
        if not out.is_dir():
            raise ExportError(f"--out exists and is not a directory: {out}")
        if not force:
            raise ExportError(f"output already exists: {out} (use --force to replace it)")
        if keep is not None and keep.resolve().is_relative_to(out.resolve()):
            raise ExportError(f"--out {out} holds the checkpoint; --force would delete it")
        if any(out.iterdir()) and not is_bundle(out):
            raise ExportError(f"--out is neither a bundle nor empty: {out} (--force only replaces a bundle)")
    for parent in Path(os.path.abspath(out)).parents:
        if parent.exists():
            if not parent.is_dir():
                raise ExportError(f"--out is under a file: {parent}")
            break


@contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """Yield an empty temporary directory next to `target` (its parents are created, and stay). On success it
    replaces `target`; on any exception or interrupt it is removed."""
    target = Path(os.path.abspath(target))  # "." and "x/.." have no name of their own to rename to
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as exc:
        raise ExportError(f"cannot write next to {target}: {exc.strerror or exc}") from None
    try:
        yield work
        try:
            work.chmod(0o755)
            if target.exists():
                shutil.rmtree(target)
            work.rename(target)
        except OSError as exc:
            raise ExportError(f"cannot move the finished directory to {target}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def built_once(path: Path, build: Callable[[Path], object]) -> Path:
    """`path`, built by `build(directory)` in a staged directory unless a complete build is already there (it holds
    `COMPLETE_MARK`, written last): a failed or interrupted build leaves nothing a later call would trust."""
    if not (path / COMPLETE_MARK).is_file():
        with staged_directory(path) as staging:
            build(staging)
            (staging / COMPLETE_MARK).touch()
    return path
